"""task=dpo switches dropout off (dpo.disable_dropout, TRL's default): with a checkpoint that has
dropout (a tiny GPT-2 with resid/embd/attn_pdrop 0.1, and with peft=lora's lora_dropout 0.05) the
first step is exactly ln 2 with every reward 0, and the run equals a plain DPO loop whose
policy forward runs in eval mode (log-probs computed here with the HF model)."""

import json
import math

import pytest
import torch
from conftest import compose_config
from test_dpo import encoded_pairs, plain_dpo, pydoc_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from launcher.cli.app import run_task
from launcher.schema import ASSETS_DIR

LN2 = math.log(2)
BETA, LR, BATCH, STEPS = 0.5, 1e-3, 4, 3


@pytest.fixture(scope="module")
def gpt2_with_dropout(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropout")
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pydoc_pairs(12, 0)))
    (root / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pydoc_pairs(4, 12)))
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny_bpe")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=4096, n_embd=32, n_layer=2, n_head=2, n_positions=128, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    args = ["task=dpo", "data=files", f"data.load_path={root / 'train.jsonl'}",
            f"data.eval_split={root / 'eval.jsonl'}", f"model.path={root / 'model'}",
            f"model.tokenizer={ASSETS_DIR / 'tiny_bpe'}", "train.max_seq_len=64", f"train.max_steps={STEPS}",
            "train.logging_steps=1", f"data.train_bs={BATCH}", "data.eval_bs=4", f"dpo.beta={BETA}",
            f"optimizer.lr={LR}", "scheduler=constant", "train.max_grad_norm=null"]
    return root, args


def train_rows(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


def plain_run_without_dropout(root) -> list[float]:
    """The plain DPO loop of tests/test_dpo.py with the policy in eval mode (no dropout), GPT-2's
    biases and LayerNorm weights spared from weight decay, a constant lr and no clipping."""
    model = AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="sdpa").eval()
    reference = AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="sdpa").eval()
    params = dict(model.named_parameters())
    spared = [p for name, p in params.items() if name.endswith(".bias") or ".ln_" in name]
    decayed = [p for name, p in params.items() if not (name.endswith(".bias") or ".ln_" in name)]
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": spared, "weight_decay": 0.0}], lr=LR,
                                  weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5)
    pairs = encoded_pairs(root, "train")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(11)).tolist()
    losses = []
    for step in range(STEPS):
        loss, _ = plain_dpo(model, reference, [pairs[i] for i in order[step * BATCH:(step + 1) * BATCH]], BETA)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_step_0_is_ln2_with_a_dropout_checkpoint_and_the_run_equals_a_plain_loop(gpt2_with_dropout, tmp_path):
    root, args = gpt2_with_dropout
    run_task(compose_config([*args, f"output_dir={tmp_path / 'run'}"]))
    rows = train_rows(tmp_path / "run")
    assert rows[0]["rewards_chosen"] == rows[0]["rewards_rejected"] == 0.0
    assert rows[0]["train_loss"] == pytest.approx(LN2, rel=1e-7)
    for mine, theirs in zip(rows, plain_run_without_dropout(root), strict=True):
        assert mine["train_loss"] == pytest.approx(theirs, rel=1e-5)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_lora_dropout_is_switched_off_too_and_disable_dropout_false_keeps_it(gpt2_with_dropout, tmp_path):
    _, args = gpt2_with_dropout
    lora = [*args, "peft=lora", "train.max_steps=1"]
    run_task(compose_config([*lora, f"output_dir={tmp_path / 'off'}"]))  # peft.lora_dropout stays 0.05
    [first] = train_rows(tmp_path / "off")
    assert first["rewards_chosen"] == first["rewards_rejected"] == 0.0
    assert first["train_loss"] == pytest.approx(LN2, rel=1e-7)
    # the key is what does it: with dropout kept, the policy's first forward is noise around the reference
    run_task(compose_config([*lora, "dpo.disable_dropout=false", f"output_dir={tmp_path / 'kept'}"]))
    [first] = train_rows(tmp_path / "kept")
    assert first["rewards_chosen"] != 0.0 and first["rewards_rejected"] != 0.0
    assert first["train_loss"] != pytest.approx(LN2, rel=1e-7)
