"""The preprocessing cache: a damaged entry (a flipped bit, a truncated Arrow file) is detected
by its checksums and rebuilt; concurrent builders of one entry build it once and all succeed."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from datasets import load_from_disk
from filelock import FileLock

from launcher.data.preprocessing import lock_path, prepared_splits
from launcher.distributed import ONE_PROCESS
from launcher.model.modeling import load_tokenizer
from launcher.store.integrity import damaged_files


def _entry(cache: Path) -> Path:
    entries = [p for p in (cache / "pydoc").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    return entries[0]


def _arrow_file(entry: Path) -> Path:
    return next((entry / "train").glob("*.arrow"))


def _rows(splits):
    return {name: split.to_dict() for name, split in splits.items()}


def _prepare(cache: Path):
    cfg = compose_config(["train.max_seq_len=32", f"data.cache_dir={cache}"])
    return prepared_splits(cfg, load_tokenizer(cfg.model), ONE_PROCESS)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_flipped_bit_in_a_cached_arrow_file_is_detected_and_the_entry_rebuilt(tmp_path, caplog):
    original = _rows(_prepare(tmp_path))
    entry = _entry(tmp_path)
    arrow = _arrow_file(entry)
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the token ids
    arrow.write_bytes(bytes(data))
    assert damaged_files(entry) == [f"train/{arrow.name}"]
    with caplog.at_level(logging.WARNING, logger="hydralm"):
        again = _rows(_prepare(tmp_path))
    assert f"cache entry {entry} is damaged (train/{arrow.name} differs from the checksum" in caplog.text
    assert again == original
    assert damaged_files(entry) == []


def test_a_truncated_arrow_file_in_the_cache_is_rebuilt(tmp_path, caplog):
    original = _rows(_prepare(tmp_path))
    entry = _entry(tmp_path)
    arrow = _arrow_file(entry)
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 3])
    with caplog.at_level(logging.WARNING, logger="hydralm"):
        assert _rows(_prepare(tmp_path)) == original
    assert "is damaged" in caplog.text


def _wait_for(paths, text, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(text in Path(p).read_text() for p in paths):
            return True
        time.sleep(0.2)
    return False


def _start(args, log: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
def test_two_preprocessing_runs_of_the_same_settings_at_once_build_once_and_both_succeed(tmp_path):
    """The test holds the entry's lock while both start, so they are sure to meet there."""
    out = tmp_path / "data"
    args = ["-m", "launcher", "task=preprocess", "train.max_seq_len=32", f"data.save_path={out}"]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    lock = FileLock(str(lock_path(out)))
    lock.acquire()
    try:
        runs = [_start([*args, f"output_dir={tmp_path / f'run{i}'}"], log, tmp_path) for i, log in enumerate(logs)]
        assert _wait_for(logs, "waiting for another process that is building"), [p.read_text()[-2000:] for p in logs]
    finally:
        lock.release()
    assert [run.wait(timeout=600) for run in runs] == [0, 0], [p.read_text()[-2000:] for p in logs]
    texts = [p.read_text() for p in logs]
    assert sum("is up to date" in t for t in texts) == 1 and sum("train / " in t for t in texts) == 1
    assert damaged_files(out) == [] and len(load_from_disk(str(out / "train"))) > 0


@pytest.mark.slow
def test_two_training_runs_on_a_cold_cache_both_get_the_same_rows(tmp_path):
    script = (
        "import json, logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from conftest import compose_config\n"
        "from launcher.data.preprocessing import prepared_splits\n"
        "from launcher.distributed import ONE_PROCESS\n"
        "from launcher.model.modeling import load_tokenizer\n"
        f"cfg = compose_config(['train.max_seq_len=32', 'data.cache_dir={tmp_path / 'cache'}'])\n"
        "splits = prepared_splits(cfg, load_tokenizer(cfg.model), ONE_PROCESS)\n"
        "print('ROWS', json.dumps({name: len(split) for name, split in splits.items()}))\n"
        "print('FIRST', json.dumps(splits['train'][0]['input_ids']))\n"
    )
    (tmp_path / "cache" / "pydoc").mkdir(parents=True)
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    runs = [_start(["-c", script], log, tmp_path) for log in logs]
    assert [run.wait(timeout=600) for run in runs] == [0, 0], [p.read_text()[-3000:] for p in logs]
    results = [[line for line in p.read_text().splitlines() if line.startswith(("ROWS", "FIRST"))] for p in logs]
    assert results[0] == results[1] and len(results[0]) == 2
    entry = _entry(tmp_path / "cache")
    assert damaged_files(entry) == [] and json.loads((entry / "report.json").read_text())["train_rows"] > 0


def test_a_damaged_preprocessed_dataset_is_refused_before_training(tmp_path):
    from launcher.cli.app import run_task
    from launcher.errors import ConfigError

    out = tmp_path / "data"
    run_task(compose_config(["task=preprocess", "train.max_seq_len=32", f"data.save_path={out}",
                             f"output_dir={tmp_path / 'pre'}"]))
    arrow = _arrow_file(out)
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0x01
    arrow.write_bytes(bytes(data))
    cfg = compose_config(["data=preprocessed", f"data.train_ds={out / 'train'}", f"data.eval_ds={out / 'eval'}",
                          "train.max_seq_len=32", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=rf"{out / 'train'}: train/{arrow.name} differs from the checksum task=preprocess recorded"):
        run_task(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
