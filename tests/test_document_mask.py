"""data.document_mask: the loss of a packed batch equals the loss of its documents run one by one.

flex_attention runs here forward only: torch has no FlexAttention backward on CPU (training with it
on CPU is refused before any work); its forward is compiled by transformers (inductor, ~15 s)."""

import copy

import numpy as np
import pytest
import torch
from conftest import assert_rejected_before_any_work, compose_config, pack

from launcher.data.loaders import PadCollator
from launcher.data.packing import Documents, PackingSpec
from launcher.distributed import World
from launcher.model.losses import token_loss_sum
from launcher.model.modeling import build_model, load_tokenizer

IGNORE = -100


def _packed_batch(tokenizer, document_mask):
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 4000, size=n).tolist() for n in (5, 17, 3, 9, 30, 2, 11)]
    spec = PackingSpec("full", 24, bos_eos=(tokenizer.bos_token_id, tokenizer.eos_token_id), ignore_index=IGNORE)
    rows = pack(Documents.from_lists(docs), spec).to_pylist()
    collate = PadCollator(tokenizer.pad_token_id, IGNORE, document_mask=document_mask)
    return collate([{k: np.array(v) for k, v in row.items()} for row in rows])


def _one_by_one_loss(model, batch):
    """Every document piece of every row (split where position_ids restart) as its own sequence."""
    total = torch.zeros(())
    for input_ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        starts = torch.nonzero(positions == 0).flatten().tolist() + [len(positions)]
        for a, b in zip(starts, starts[1:]):
            piece = {"input_ids": input_ids[a:b][None], "labels": labels[a:b][None]}
            total += token_loss_sum(model, piece, IGNORE, torch.device("cpu"))
    return total


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention"])
def test_packed_loss_equals_documents_one_by_one(attention):
    cfg = compose_config([f"model.attention={attention}"])
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer, World(0, 0, 1, 1, torch.device("cpu"))).eval()
    assert model.config._attn_implementation == attention
    # The reference: the same weights, each document alone with plain causal (eager) attention.
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    batch = _packed_batch(tokenizer, document_mask=True)
    assert (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]  # rows really hold several documents
    with torch.no_grad():
        packed = token_loss_sum(model, batch, IGNORE, torch.device("cpu"))
        separate = _one_by_one_loss(reference, batch)
        # Control: the same rows without the document mask let documents see each other.
        unmasked = token_loss_sum(reference, {"input_ids": batch["input_ids"], "labels": batch["labels"]}, IGNORE,
                                  torch.device("cpu"))
    assert model.config._attn_implementation == attention and reference.config._attn_implementation == "eager"
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)
    assert abs(unmasked.item() - separate.item()) > 1e-2


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_train_task_runs_with_document_mask(tmp_path):
    from launcher.cli.app import run_task

    cfg = compose_config(["data.document_mask=true", "train.max_steps=2", "train.logging_steps=2",
                          "train.max_eval_batches=1", f"output_dir={tmp_path}"])
    summary = run_task(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["final_eval_loss"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("task", [["task=train"], ["task=dpo", "data=pydoc_pairs"]])  # every task that trains
def test_flex_attention_training_on_cpu_is_refused_before_any_work(task, tmp_path):
    assert_rejected_before_any_work([*task, "model.attention=flex_attention"],
                                    "model.attention=flex_attention cannot train on CPU", tmp_path)
