"""The preprocess pipeline end to end: sources, every option on hand-written examples, bad input,
and the cache."""

import json
import logging
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, compose_config
from datasets import Dataset, DatasetDict, load_from_disk

from launcher.cli.app import run_task
from launcher.data import preprocessing as data_module
from launcher.data.preprocessing import Tokenize, prepared_splits
from launcher.data.sources import pydoc_documents, source_of
from launcher.distributed import ONE_PROCESS
from launcher.errors import ConfigError
from launcher.model.modeling import load_tokenizer

TEXTS = [
    "Question: what is a list? Answer: a mutable sequence.",
    "Question: what is a tuple? Answer: an immutable sequence.",
    "no separator in this one",
    "Question: what is a dict? Answer: a mapping from keys to values.",
    "Question: what is a set? Answer: an unordered collection of unique items.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config().model)


@pytest.fixture
def disk_dataset(tmp_path):
    path = tmp_path / "ds"
    DatasetDict({
        "train": Dataset.from_dict({"body": TEXTS * 4}),
        "validation": Dataset.from_dict({"body": TEXTS[:2]}),
    }).save_to_disk(str(path))
    return path


def _preprocess(tmp_path, overrides, name="out"):
    cfg = compose_config(["task=preprocess", "train.max_seq_len=16", f"data.save_path={tmp_path / name}",
                          f"output_dir={tmp_path / 'run'}", *overrides])
    return run_task(cfg), tmp_path / name


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_gives_the_tokenizer_ids(tokenizer):
    texts = [text for _, text in pydoc_documents()[:20]]
    out = Tokenize(tokenizer, compose_config().data)({"text": texts}, list(range(20)))
    assert out.column("input_ids").to_pylist() == [_encode(tokenizer, t) for t in texts]
    assert all(all(mask) for mask in out.column("trained").to_pylist())


def test_disk_source_with_eval_split_separator_and_no_packing(tmp_path, disk_dataset, tokenizer):
    summary, out = _preprocess(tmp_path, ["data=disk", f"data.load_path={disk_dataset}", "data.data_field=body",
                                          "data.eval_split=validation", "data.packing_type=null",
                                          "data.seperator=Answer:", "train.max_seq_len=64"])
    assert summary["dropped"] == {"no separator": 4} and summary["examples"] == 22
    assert summary["first_dropped"] == {"no separator": "train row 2"}
    train, evaluation = load_from_disk(str(out / "train")), load_from_disk(str(out / "eval"))
    assert len(train) == 16 and len(evaluation) == 2
    assert set(train.column_names) == {"input_ids", "labels", "position_ids", "id"}
    row = train[0]
    prompt = _encode(tokenizer, "Question: what is a list? Answer:")
    answer = _encode(tokenizer, " a mutable sequence.")
    assert row["input_ids"] == [tokenizer.bos_token_id, *prompt, *answer, tokenizer.eos_token_id]
    assert row["labels"] == [tokenizer.bos_token_id] + [-100] * len(prompt) + answer + [tokenizer.eos_token_id]
    assert row["position_ids"] == list(range(len(row["input_ids"])))
    assert [r["id"] for r in train][:4] == [0, 1, 3, 4]  # source rows; row 2 has no separator
    assert json.loads((out / "settings.json").read_text())["separator"] == "Answer:"


def test_missing_split_lists_the_available_ones(tmp_path, disk_dataset):
    with pytest.raises(ConfigError, match="data.split=test is not a split of .*; available splits: train, validation"):
        _preprocess(tmp_path, ["data=disk", f"data.load_path={disk_dataset}", "data.split=test", "data.data_field=body"])


def test_missing_data_field_names_the_columns(tmp_path, disk_dataset):
    with pytest.raises(ConfigError, match="data.data_field=text is not a column of the dataset; columns: body"):
        _preprocess(tmp_path, ["data=disk", f"data.load_path={disk_dataset}"])


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet", "txt"])
def test_files_source_reads_every_format(tmp_path, suffix):
    texts = [t.replace(",", " ") for t in TEXTS]
    frame = pd.DataFrame({"text": texts})
    path = tmp_path / f"part-0.{suffix}"
    if suffix in ("json", "jsonl"):
        frame.to_json(path, orient="records", lines=True)
    elif suffix == "csv":
        frame.to_csv(path, index=False)
    elif suffix == "parquet":
        frame.to_parquet(path)
    else:
        path.write_text("\n".join(texts) + "\n")
    cfg = compose_config(["data=files", f"data.load_path={tmp_path}/part-*.{suffix}", "data.text_unit=line"])
    assert source_of(cfg.data).splits()["train"]["text"] == texts


def test_files_source_takes_eval_examples_from_eval_split_files(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    cfg = compose_config(["data=files", f"data.load_path={tmp_path}/train.jsonl", f"data.eval_split={tmp_path}/val.jsonl"])
    splits = source_of(cfg.data).splits()
    assert splits["train"]["text"] == TEXTS and splits["eval"]["text"] == TEXTS[:1]


def test_files_source_packs_partially_with_a_pre_pend_and_held_out_eval(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 2))
    summary, out = _preprocess(tmp_path, ["data=files", f"data.load_path={tmp_path}/*.jsonl", "data.eval_every=5",
                                          "data.packing_type=partial", "data.add_bos_eos_tokens=false",
                                          "data.pre_pend='>> '"])
    train, evaluation = load_from_disk(str(out / "train")), load_from_disk(str(out / "eval"))
    assert sorted(set(evaluation["id"])) == [0, 5]
    first = [r["input_ids"] for r in evaluation if r["id"] == 0]
    assert [t for chunk in first for t in chunk] == _encode(tokenizer, ">> " + TEXTS[0])
    assert all(len(ids) <= 16 for ids in train["input_ids"])
    assert summary["train_rows"] == len(train) and summary["eval_rows"] == len(evaluation)


def test_hub_without_network_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr("launcher.data.sources._hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="data.source=hub cannot load data.load_path=nobody/nothing split=train: "
                                          "the Hub is unreachable"):
        _preprocess(tmp_path, ["data=hub", "data.load_path=nobody/nothing"])
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "out").exists()


def test_hub_reachability_probe_is_bounded():
    from launcher.data.sources import HUB_PROBE_TIMEOUT_S, _hub_reachable

    start = time.perf_counter()
    _hub_reachable()
    assert time.perf_counter() - start < HUB_PROBE_TIMEOUT_S + 2


def test_overlong_examples_without_packing_are_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hydralm"):
        summary, _ = _preprocess(tmp_path, ["data.packing_type=null"])
    topics = len(pydoc_documents())  # every topic is longer than 14 tokens
    assert summary["longer_than_max_seq_len"] == summary["examples"] == topics
    assert f"{topics} of {topics} examples are longer than train.max_seq_len=16" in caplog.text


def test_truncate_cuts_every_row_to_max_seq_len(tmp_path, tokenizer):
    summary, out = _preprocess(tmp_path, ["data.packing_type=null", "data.truncate=true"])
    train = load_from_disk(str(out / "train"))
    topics = len(pydoc_documents())
    assert len(train) == summary["train_rows"] == topics - len(range(0, topics, 10))  # every 10th is eval
    assert all(len(ids) == 16 and ids[-1] == tokenizer.eos_token_id and ids[0] == tokenizer.bos_token_id
               for ids in train["input_ids"])


def test_preprocess_hits_its_cache_and_any_setting_invalidates_it(tmp_path):
    first, _ = _preprocess(tmp_path, [])
    again, _ = _preprocess(tmp_path, [])
    changed, _ = _preprocess(tmp_path, ["data.overlap=3"])
    assert not first["cached"] and again["cached"] and not changed["cached"]
    assert changed["train_rows"] > first["train_rows"]


def test_train_cache_is_keyed_by_settings(monkeypatch, tmp_path):
    cfg = compose_config(["train.max_seq_len=32", f"data.cache_dir={tmp_path}"])
    tokenizer = load_tokenizer(cfg.model)
    prepared_splits(cfg, tokenizer, ONE_PROCESS)
    monkeypatch.setattr(data_module, "build_and_save", lambda *a: pytest.fail("rebuilt an up-to-date cache"))
    prepared_splits(cfg, tokenizer, ONE_PROCESS)
    monkeypatch.undo()
    cfg.data.pre_pend = "# "
    prepared_splits(cfg, tokenizer, ONE_PROCESS)
    assert len([entry for entry in (tmp_path / "pydoc").iterdir() if not entry.name.startswith(".")]) == 2


def test_rows_do_not_depend_on_the_packing_batch_size(tmp_path, monkeypatch):
    """The corpus streams through packing in batches (bounded memory); small batches change nothing."""
    overrides = ["data.separator=:", "data.overlap=3"]
    _, whole = _preprocess(tmp_path, overrides, name="whole")
    monkeypatch.setattr(data_module, "PACK_BATCH", 7)
    _, batched = _preprocess(tmp_path, overrides, name="batched")
    for split in ("train", "eval"):
        assert load_from_disk(str(batched / split)).to_list() == load_from_disk(str(whole / split)).to_list()


def test_tokenizer_without_bos_eos_is_an_error(tmp_path):
    import shutil

    from launcher.schema import ASSETS_DIR

    no_bos = tmp_path / "tok"
    shutil.copytree(ASSETS_DIR / "tiny_bpe", no_bos)
    config = json.loads((no_bos / "tokenizer_config.json").read_text())
    config.pop("bos_token")
    (no_bos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="data.add_bos_eos_tokens=true but the tokenizer has no BOS or EOS token"):
        _preprocess(tmp_path, [f"model.tokenizer={no_bos}"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.truncate=true"], "data.truncate=true and data.packing_type=full exclude each other"),
        (["data.overlap=14"], "data.overlap=14 must be smaller than the chunk size 14 (train.max_seq_len - 2 for BOS/EOS)"),
        (["data.add_bos_eos_tokens=false", "data.overlap=16"], "data.overlap=16 must be smaller than the chunk size 16"),
        (["data.packing_type=null", "data.overlap=2"], "data.overlap=2 needs data.packing_type"),
        (["data.overlap=-1"], "data.overlap=-1 must be >= 0"),
        (["data.packing_type=half"], "data.packing_type='half' is not valid; choose one of: full, partial"),
        (["data.dataset_format=json"], "data.dataset_format='json' is not valid; choose one of: hf"),
        (["data.separator=A", "data.seperator=B"], "data.separator='A' and its alias data.seperator='B' differ"),
        (["data.packing_type=partial", "data.document_mask=true"], "data.document_mask=true needs data.packing_type=full"),
        (["data.eval_split=validation"], "data.eval_split is a key of data=disk/files/hub; data=pydoc ignores it"),
        (["data.source=s3"], "data.source='s3' is not valid; choose one of: pydoc, pydoc_chat, disk, files, hub, preprocessed, mixture"),
        (["data.num_proc=0"], "data.num_proc=0 must be >= 1"),
        (["data.format=chatty"], "data.format='chatty' is not valid; choose one of: text, chat, prompt_completion"),
        (["data=pydoc_chat", "data.separator=A:"], "data.separator applies to data.format=text"),
        (["data=pydoc_chat", "data.pre_pend=x"], "data.pre_pend does not apply to data.format=chat"),
        (["data=pydoc_chat", "data.add_bos_eos_tokens=true"], "data.add_bos_eos_tokens=true does not apply to data.format=chat"),
        (["data=pydoc_chat", "data.chat_template=/no/such/template.jinja"],
         "data.chat_template=/no/such/template.jinja is neither a file nor a Jinja template"),
        (["data.chat_template='{{ messages }}'"], "data.chat_template applies to data.format=chat or prompt_completion"),
        (["data.format=prompt_completion", "data.completion_field=prompt"], "data.prompt_field and data.completion_field are both 'prompt'"),
        (["data=disk"], "data.load_path must be set for data.source=disk"),
        (["data=disk", "data.load_path=/no/such/ds"], "data.load_path=/no/such/ds does not exist"),
        (["data=hub"], "data.load_path must be set for data.source=hub"),
        (["data=files", "data.load_path=/no/such/*.jsonl"], "data.load_path=/no/such/*.jsonl matches no file"),
        (["data=files", f"data.load_path={ROOT}/pyproject.toml"], "unsupported file type; supported: .json, .jsonl, .csv"),
    ],
)
def test_bad_data_settings_are_named_before_any_work(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        _preprocess(tmp_path, overrides)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bench_smoke_prints_the_three_ratios():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "preprocess.py"), "--smoke"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-3:]
    patterns = [r"ratio hydralm/group_texts: \d+\.\d+", r"ratio packing-only: \d+\.\d+", r"scaling time\(2N\)/time\(N\): \d+\.\d+"]
    assert all(re.fullmatch(p, line) for p, line in zip(patterns, last)), last
    assert np.isfinite([float(line.rsplit(" ", 1)[1]) for line in last]).all()
