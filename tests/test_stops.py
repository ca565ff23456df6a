"""How a run stops early: Ctrl-C and SIGTERM (a checkpoint at the next step boundary, one line),
a non-finite loss or gradient norm (one line naming the step, nothing saved from it), and a full
disk (one line naming the path and what was kept, no partial files left)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_rejected_before_any_work, compose_config, run_launcher

from launcher.cli.app import run_task
from launcher.errors import RunStopped

SMALL = ["train.max_seq_len=64", "data.train_bs=2", "data.eval_bs=4", "train.max_eval_batches=1",
         "train.logging_steps=2"]
# Long enough that a signal sent after the first logged row arrives mid-run; no periodic checkpoint.
LONG = [*SMALL, "train.max_steps=40", "train.checkpointing_enabled=true", "train.save_steps=1000"]


def checkpoints(output_dir: Path) -> list[str]:
    root = output_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def hydralm_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("hydralm:")]


# ---------------------------------------------------------------------- signals


def start(command: list[str], tmp_path: Path) -> subprocess.Popen:
    """In its own session, like a job started from a terminal (Ctrl-C signals its process group)."""
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def signal_once_training(process: subprocess.Popen, output_dir: Path, signum: int) -> None:
    """Waits for the first logged train row, then signals the process group."""
    metrics, deadline = output_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and "train_loss" in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signum)


def saved_step(line: str) -> int:
    return int(line.split(" after step ")[1].split(":")[0])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_at_the_next_step_and_stops_with_one_line(tmp_path, signum):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "launcher", *LONG, "data.num_workers=1", f"output_dir={out}"]
    process = start(command, tmp_path)
    signal_once_training(process, out, signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = hydralm_lines(stderr)
    step = saved_step(line)
    saved = out / "checkpoints" / f"checkpoint-{step:08d}"
    assert line == (f"hydralm: stopped by {signal.Signals(signum).name} after step {step}: saved {saved}; "
                    f"the same command resumes from it")
    assert checkpoints(out) == [saved.name] and 2 <= step < 40
    assert json.loads((saved / "trainer_state.json").read_text())["progress"]["step"] == step

    if signum == signal.SIGINT:  # the same command continues from there to the end
        result = run_launcher(command[3:], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"hydralm: resuming from {saved} (step {step}," in result.stdout
        assert json.loads((out / "summary.json").read_text())["steps"] == 40


@pytest.mark.slow
def test_without_checkpointing_a_signal_stops_with_one_line_and_saves_nothing(tmp_path):
    out = tmp_path / "run"
    process = start([sys.executable, "-m", "launcher", *SMALL, "train.max_steps=40", f"output_dir={out}"], tmp_path)
    signal_once_training(process, out, signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM
    (line,) = hydralm_lines(stderr)
    assert line.startswith("hydralm: stopped by SIGTERM after step ")
    assert line.endswith(": nothing saved (train.checkpointing_enabled=false)")
    assert checkpoints(out) == [] and not (out / "final-model").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """The first Ctrl-C is recorded for the next step boundary; a second one does not wait for it."""
    script = ("import sys, time, torch\n"
              "from launcher.distributed import World\n"
              "from launcher.training.preemption import StopSignals\n"
              "with StopSignals(World(0, 0, 1, 1, torch.device('cpu'))) as signals:\n"
              "    print('ready', flush=True)\n"
              "    time.sleep(120)\n")
    process = start([sys.executable, "-c", script], tmp_path)
    assert process.stdout.readline() == "ready\n"
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None  # the first one only asked for a stop at the next step boundary
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 128 + signal.SIGINT
    assert stderr.strip() == "hydralm: interrupted again: exiting now, without a checkpoint"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_under_torchrun_checkpoints_both_ranks_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "launcher",
               "sharding=full_shard", *LONG, "data.num_workers=1", f"output_dir={out}"]
    process = start(command, tmp_path)
    signal_once_training(process, out, signal.SIGINT)  # torchrun forwards it to both ranks
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0  # torchrun reports the signal it got
    (line,) = hydralm_lines(stderr)  # rank 0 speaks for both
    step = saved_step(line)
    saved = out / "checkpoints" / f"checkpoint-{step:08d}"
    assert line.startswith(f"hydralm: stopped by SIGINT after step {step}: saved {saved}")
    assert checkpoints(out) == [saved.name]
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["progress"]["step"] == step
    recorded = json.loads((saved / "COMPLETE").read_text())["checksums"]["files"]
    assert {"rank-0.json", "rank-1.json", "__0_0.distcp", "__1_0.distcp", ".metadata"} <= recorded.keys()


@pytest.mark.slow
def test_a_native_crash_prints_the_python_stack_of_every_thread():
    """An abort inside a C++ library (say torch's teardown) is otherwise one line with no place in
    it; the job log then names the Python line that was running, the launcher's own frames too."""
    script = ("import os, sys\n"
              "import launcher.cli.app as app\n"
              "app._hydra_main = os.abort  # stands in for a task whose C++ code aborts\n"
              "sys.argv = ['launcher']\n"
              "app.main()\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in result.stderr
    assert re.search(r'File ".*launcher/cli/app\.py", line \d+ in main', result.stderr), result.stderr


# ---------------------------------------------------------------------- non-finite values


def test_a_non_finite_max_grad_norm_is_refused_before_any_work(tmp_path):
    assert_rejected_before_any_work(["train.max_grad_norm=nan"], "train.max_grad_norm=nan must be a finite number > 0",
                                    tmp_path)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_nan_loss_stops_the_run_naming_the_step_before_anything_is_saved_from_it(tmp_path):
    from launcher.training.trainer import Trainer
    from tasks.train import LanguageModeling

    class NanAtStep3(LanguageModeling):
        calls = 0

        def loss(self, model, batch):
            loss_sum, metrics = super().loss(model, batch)
            if model.training:
                NanAtStep3.calls += 1
                if NanAtStep3.calls == 3:
                    loss_sum = loss_sum * float("nan")
            return loss_sum, metrics

    out = tmp_path / "run"
    cfg = compose_config([*SMALL, "train.max_steps=6", "train.checkpointing_enabled=true", "train.save_steps=2",
                          f"output_dir={out}"])
    with pytest.raises(RunStopped) as stopped:
        Trainer(cfg, NanAtStep3(cfg)).run()
    assert str(stopped.value) == (
        f"error: the loss and gradient norm were not finite at step 3; stopped without saving the model from that step "
        f"on (latest checkpoint: {out / 'checkpoints' / 'checkpoint-00000002'}). Lower optimizer.lr, set "
        f"train.max_grad_norm, or check the data")
    assert stopped.value.exit_code == 1
    assert checkpoints(out) == ["checkpoint-00000002"] and not (out / "final-model").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == 2  # no row with a NaN in it


@pytest.mark.slow
def test_a_diverging_run_exits_1_with_one_line_and_no_final_model(tmp_path):
    out = tmp_path / "run"
    result = run_launcher([*SMALL, "train.max_steps=6", "optimizer.lr=1e30", f"output_dir={out}"], cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = hydralm_lines(result.stderr)
    assert line.startswith("hydralm: error: the ") and " was not finite at step " in line
    assert not (out / "final-model").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="waiting for the device is a CUDA matter")
def test_watching_for_non_finite_values_never_waits_for_the_device():
    from launcher.distributed import World
    from launcher.training.trainer import FirstNonFinite

    watch = FirstNonFinite(World(0, 0, 1, 1, torch.device("cuda")))
    loss, norm = torch.tensor(2.0, device="cuda"), torch.tensor(float("inf"), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2, 3):
            watch.observe(step, loss, norm if step > 1 else loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert watch.first() == ("gradient norm", 2)


# ---------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """mount(megabytes) -> a directory on a tmpfs of that size (unmounted afterwards)."""
    mounted = []

    def mount(megabytes: int) -> Path:
        path = tmp_path / f"disk-{megabytes}m"
        path.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command to make a size-limited filesystem")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"a size-limited tmpfs needs root (CAP_SYS_ADMIN): {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=True)


# The tiny model's checkpoint takes ~41 MB (weights and AdamW state), its final model ~14 MB.
@pytest.mark.slow
@pytest.mark.parametrize("megabytes, overrides, target, kept", [
    (30, ["train.checkpointing_enabled=true"], "checkpoints/checkpoint-00000002", "no checkpoint"),
    (60, ["train.checkpointing_enabled=true"], "checkpoints/checkpoint-00000004", "checkpoints/checkpoint-00000002"),
    (8, [], "final-model", "no final-model"),
], ids=["first-checkpoint", "second-checkpoint", "final-model"])
def test_a_full_disk_stops_with_one_line_naming_the_path_and_what_was_kept(small_disk, megabytes, overrides,
                                                                           target, kept):
    out = small_disk(megabytes) / "run"
    cfg = compose_config([*SMALL, "train.max_steps=6", "train.save_steps=2", *overrides, f"output_dir={out}"])
    with pytest.raises(RunStopped) as stopped:
        run_task(cfg)
    target = out / target
    kept = str(out / kept) if kept.startswith("checkpoints/") else kept
    assert str(stopped.value) == (f"error: no space left on {target.parent} (No space left on device) while writing "
                                  f"{target.name}: its partial files are removed; kept: {kept}")
    leftovers = [p.name for p in target.parent.iterdir() if p.name.endswith(".partial")]
    assert leftovers == [] and not target.exists()
    if kept.startswith(str(out)):
        assert (Path(kept) / "COMPLETE").is_file()
