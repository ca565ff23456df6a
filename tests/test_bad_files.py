"""Bad data files: each is one `hydralm: error: <file>: <what is wrong>` line (exit 2) before any
model loads, and nothing is written; rows dropped for any reason are counted by reason."""

import json
import logging

import pandas as pd
import pytest
from conftest import compose_config, run_launcher
from datasets import Dataset

from launcher.cli.app import run_task
from launcher.errors import ConfigError

MESSAGES = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

# name, bytes, extra overrides, the message after "<file>: "
BAD_FILES = [
    ("empty.jsonl", b"", [], "empty file (no rows)"),
    ("empty.txt", b"", [], "empty file (no rows)"),
    ("blank.jsonl", b"\n\n  \n", [], "no rows (the file is empty or blank)"),
    ("header.csv", b"text\n", [], "no rows (only a header)"),
    ("latin1.txt", "café au lait\n".encode("latin-1"), [], "not UTF-8 text (byte 0xe9: invalid continuation byte)"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', [], "row 1: column text is not UTF-8 text"),
    ("numbers.jsonl", b'{"text": 1}\n{"text": 2}\n', [], "data.data_field=text holds int64 values, not text"),
    ("mixed.jsonl", b'{"text": "a"}\n{"text": 2}\n', [], "row 1: data.data_field=text is int 2, not text"),
    ("truncated.jsonl", b'{"text": "a"}\n{"text": "b', [], "not valid JSON Lines (Missing a closing quotation mark in string."),
    ("garbage.jsonl", b"hello world\nnot json\n", [], "not valid JSON Lines (Invalid value."),
    ("bad.parquet", b"PAR1garbage", [], "not a readable Parquet file (Parquet magic bytes not found in footer."),
    ("messages.jsonl", (json.dumps(MESSAGES) + "\n").encode(), [],
     "data.data_field=text is not a column of the dataset; columns: messages; messages holds conversations: use data.format=chat"),
    ("messages.jsonl", (json.dumps(MESSAGES) + "\n").encode(), ["data.data_field=messages"],
     "data.data_field=messages holds conversations (lists of messages), not text; use data.format=chat"),
    ("plain.jsonl", b'{"text": "a"}\n', ["data.format=chat"], "data.data_field=messages is not a column of the dataset; columns: text"),
    ("numbers.jsonl", b'{"text": 1}\n', ["data.format=chat", "data.data_field=text"],
     "data.data_field=text holds int64 values, not conversations"),
    ("pairs.jsonl", b'{"prompt": "a", "answer": "b"}\n', ["data.format=prompt_completion"],
     "data.completion_field=completion is not a column of the dataset; columns: prompt, answer"),
]


def _preprocess(tmp_path, overrides):
    cfg = compose_config(["task=preprocess", "data=files", f"data.save_path={tmp_path / 'out'}",
                          f"output_dir={tmp_path / 'run'}", "train.max_seq_len=32", *overrides])
    return run_task(cfg)


@pytest.mark.parametrize("name,content,overrides,message", BAD_FILES, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_FILES)])
def test_a_bad_file_is_one_error_naming_it(tmp_path, name, content, overrides, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        _preprocess(tmp_path, [f"data.load_path={path}", *overrides])
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_bad_file_of_a_glob_is_named(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": f"text {i}.{j}"}) + "\n" for j in range(5)))
    (tmp_path / "part-1.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/part-1.jsonl: row 1: column text is not UTF-8 text"):
        _preprocess(tmp_path, [f"data.load_path={tmp_path}/part-*.jsonl"])
    (tmp_path / "part-1.jsonl").write_text('{"text": "a"}\n{"text": "b')
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/part-1.jsonl: not valid JSON Lines"):
        _preprocess(tmp_path, [f"data.load_path={tmp_path}/part-*.jsonl"])


def test_an_existing_file_is_taken_literally_not_as_a_glob(tmp_path):
    path = tmp_path / "data[1].jsonl"
    path.write_text("".join(json.dumps({"text": f"example number {i}"}) + "\n" for i in range(20)))
    summary = _preprocess(tmp_path, [f"data.load_path='{path}'"])  # quoted: [ is Hydra syntax
    assert summary["examples"] == 20


def test_a_directory_without_data_files_names_the_file_types(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(ConfigError, match=rf"data.load_path={tmp_path}/empty holds no .json/.jsonl/.csv/.parquet/.txt/.md file"):
        _preprocess(tmp_path, [f"data.load_path={tmp_path / 'empty'}"])


def test_a_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(ConfigError, match=rf"{tmp_path}/ds: not a dataset written by datasets' save_to_disk"):
        _preprocess(tmp_path, ["data=disk", f"data.load_path={tmp_path / 'ds'}"])


def _rows(path, ids, labels=True, position_ids=False):
    columns = {"input_ids": ids}
    if labels:
        columns["labels"] = ids
    if position_ids:
        columns["position_ids"] = [list(range(len(i))) for i in ids]
    Dataset.from_dict(columns).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("overrides,message", [
    ([], "data.train_ds={train} has no labels column; columns: input_ids"),
    (["data.document_mask=true"], "has no position_ids column (data.document_mask=true needs it)"),
])
def test_a_preprocessed_dataset_without_a_needed_column_is_refused_before_any_work(tmp_path, overrides, message):
    train = _rows(tmp_path / "train", [[5, 6, 7]] * 8, labels=bool(overrides))  # the second case has labels
    evaluation = _rows(tmp_path / "eval", [[5, 6, 7]] * 2)
    cfg = compose_config(["data=preprocessed", f"data.train_ds={train}", f"data.eval_ds={evaluation}",
                          f"output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError) as err:
        run_task(cfg)
    assert message.format(train=train) in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(tmp_path):
    train = _rows(tmp_path / "train", [[5, 6, 7]] * 7 + [[5, 4100, 7]])
    evaluation = _rows(tmp_path / "eval", [[5, 6, 7]] * 2)
    cfg = compose_config(["data=preprocessed", f"data.train_ds={train}", f"data.eval_ds={evaluation}",
                          f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"input_ids holds token id 4100, outside the tokenizer's vocabulary \[0, 4096\)"):
        run_task(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_negative_num_workers_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.num_workers=-1 must be >= 0"):
        run_task(compose_config(["data.num_workers=-1", f"output_dir={tmp_path / 'run'}"]))


def test_dropped_rows_are_counted_by_reason_and_printed(tmp_path, caplog):
    rows = [{"text": "a good example"}] * 12 + [{"text": ""}, {"other": "no text"}, {"text": None}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="hydralm"):
        summary = _preprocess(tmp_path, [f"data.load_path={tmp_path / 'a.jsonl'}"])
    assert summary["dropped"] == {"missing or empty text": 3}
    assert summary["first_dropped"] == {"missing or empty text": "train row 12"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["dropped"] == {"missing or empty text": 3}
    assert "dropped 3 of 15 examples: 3 missing or empty text (first: train row 12)" in caplog.text


def test_malformed_conversations_are_dropped_and_counted_by_reason(tmp_path, caplog):
    good = MESSAGES["messages"]
    conversations = [good] * 10 + [
        [{"role": "bot", "content": "x"}, *good],
        [{"role": "user", "content": "only a question"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}],
        [],
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    with caplog.at_level(logging.WARNING, logger="hydralm"):
        summary = _preprocess(tmp_path, [f"data.load_path={tmp_path / 'chat.jsonl'}", "data.format=chat"])
    assert summary["dropped"] == {"unknown role": 1, "no assistant turn": 1, "content not a string": 1,
                                  "empty conversation": 1}
    assert summary["first_dropped"]["unknown role"] == "train row 10"
    assert "dropped 4 of 14 examples" in caplog.text


def test_nothing_left_after_dropping_is_an_error_with_the_reasons(tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/chat.jsonl: the train split is empty after preprocessing \(1 examples read, 1 dropped: "
                                          r"1 no assistant turn \(first: train row 0\)\)"):
        _preprocess(tmp_path, [f"data.load_path={tmp_path / 'chat.jsonl'}", "data.format=chat"])


@pytest.mark.slow
@pytest.mark.parametrize("name,content", [("truncated.jsonl", b'{"text": "a"}\n{"text": "b'), ("bad.parquet", b"PAR1xx"),
                                          ("latin1.jsonl", b'{"text": "caf\xe9"}\n')])
def test_cli_prints_one_line_and_exits_2(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    result = run_launcher(["data=files", f"data.load_path={path}", f"output_dir={tmp_path / 'out'}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hydralm: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"hydralm: error: {path}: "), result.stderr
    assert "Traceback" not in result.stderr and "Failed to" not in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "final-model").exists()


def test_csv_and_parquet_still_read(tmp_path):
    pd.DataFrame({"text": [f"row {i}" for i in range(12)]}).to_parquet(tmp_path / "ok.parquet")
    assert _preprocess(tmp_path, [f"data.load_path={tmp_path / 'ok.parquet'}"])["examples"] == 12
