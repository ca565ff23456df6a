"""data.source=mixture: components prepared with their own formats, drawn in proportion to
their weights, deterministically by the seed; a resumed run continues at the same position."""

import json
from collections import Counter

import pytest
from conftest import assert_same_weights, compose_config, final_weights

from launcher.cli.app import run_task
from launcher.data.preprocessing import prepared_splits
from launcher.distributed import ONE_PROCESS
from launcher.errors import ConfigError
from launcher.model.modeling import load_tokenizer

MIX = "data.mixture=[{preset: pydoc, weight: 3}, {preset: pydoc_chat, weight: 1}]"


def _rows(dataset):
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in dataset]


def _splits(tmp_path, overrides):
    cfg = compose_config(["train.max_seq_len=64", f"data.cache_dir={tmp_path}", *overrides])
    return prepared_splits(cfg, load_tokenizer(cfg.model), ONE_PROCESS)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_mixture_draws_each_component_in_proportion_with_its_own_format(tmp_path):
    text = _rows(_splits(tmp_path, ["data=pydoc"])["train"])
    chat_splits = _splits(tmp_path, ["data=pydoc_chat"])
    chat = _rows(chat_splits["train"])
    mixed = _splits(tmp_path, ["data=mixture", MIX])
    rows = _rows(mixed["train"])

    total = len(text) + len(chat)
    from_text = int(0.75 * total + 0.5)  # largest remainder of 3:1, ties to the first
    counts = Counter(rows)
    assert len(rows) == total
    assert sum(n for row, n in counts.items() if row in set(text)) == from_text
    assert sum(n for row, n in counts.items() if row in set(chat)) == total - from_text
    assert {n for row, n in counts.items() if row in set(text)} <= {1, 2}  # 1.5 passes over the text rows
    assert max(n for row, n in counts.items() if row in set(chat)) == 1  # half of the chat rows, once
    assert any(-100 in labels for _, labels in chat) and not any(-100 in labels for _, labels in text)
    assert len(mixed["eval"]) == len(_splits(tmp_path, ["data=pydoc"])["eval"]) + len(chat_splits["eval"])

    assert _rows(_splits(tmp_path, ["data=mixture", MIX])["train"]) == rows  # warm cache, same order
    assert _rows(_splits(tmp_path, ["data=mixture", MIX, "train.seed=12"])["train"]) != rows
    reports = [json.loads(p.read_text()) for p in (tmp_path / "mixture").glob("*/report.json")]
    report = next(r for r in reports if r["seed"] == 11)
    assert [c["proportion"] for c in report["components"]] == [from_text / total, (total - from_text) / total]
    assert [c["format"] for c in report["components"]] == ["text", "chat"]


@pytest.mark.parametrize("mixture,message", [
    ("[]", "data.source=mixture needs data.mixture"),
    ("[{preset: pydoc, weight: 0}]", "data.mixture[0].weight=0 must be a number > 0"),
    ("[{preset: pydoc}]", "data.mixture[0].weight=None must be a number > 0"),
    ("[{preset: pydoc, weight: 1}, {preset: nope, weight: 1}]", "data.mixture[1].preset='nope' is not valid; choose one of: disk,"),
    ("[{preset: pydoc, weight: 1, formatt: chat}]", "data.mixture[0]: Key 'formatt' not in 'DataConfig'"),
    ("[{preset: pydoc, weight: 1, train_bs: 2}]", "data.mixture[0].train_bs: set data.train_bs once for the whole mixture"),
    ("[{source: mixture, weight: 1}]", "data.mixture[0]: a mixture component cannot itself be a mixture"),
    ("[{preset: files, weight: 1}]", "data.load_path must be set for data.source=files"),
    ("[{preset: pydoc, weight: 1, format: chatty}]", "data.format='chatty' is not valid; choose one of: text, chat, prompt_completion"),
])
def test_bad_mixtures_are_named_before_any_work(tmp_path, mixture, message):
    with pytest.raises(ConfigError) as err:
        run_task(compose_config(["data=mixture", f"data.mixture={mixture}", f"output_dir={tmp_path / 'out'}"]))
    assert message in str(err.value)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_mixture_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """The resumed run rebuilds the mixture from the cache (the first run built it cold) and
    continues at the same sample of the same order."""
    small = ["data=mixture", MIX, "train.max_seq_len=64", "data.train_bs=2", "data.eval_bs=4", "train.max_eval_batches=1",
             "train.max_steps=6", "train.logging_steps=2", "train.checkpointing_enabled=true", "train.save_steps=2",
             "train.keep_last_n=null"]
    run_task(compose_config([*small, f"output_dir={tmp_path / 'whole'}"]))
    step2 = tmp_path / "whole" / "checkpoints" / "checkpoint-00000002"
    state = json.loads((step2 / "trainer_state.json").read_text())
    assert state["progress"]["epoch"] == 0 and state["progress"]["epoch_samples"] == 4  # mid-epoch
    summary = run_task(compose_config([*small, f"resume={step2}", f"output_dir={tmp_path / 'resumed'}"]))
    assert summary["steps"] == 6
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "whole"))


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_preprocess_writes_the_mixture_out_with_its_report(tmp_path):
    out = tmp_path / "mixed"
    summary = run_task(compose_config(["task=preprocess", "data=mixture", MIX, "train.max_seq_len=32",
                                       f"data.save_path={out}", f"output_dir={tmp_path / 'run'}"]))
    report = json.loads((out / "report.json").read_text())
    assert [c["weight"] for c in report["components"]] == [3, 1] and summary["train_rows"] == report["train_rows"]
    splits = _splits(tmp_path, ["data=preprocessed", f"data.train_ds={out / 'train'}", f"data.eval_ds={out / 'eval'}"])
    assert len(splits["train"]) == report["train_rows"] and len(splits["eval"]) == report["eval_rows"]
