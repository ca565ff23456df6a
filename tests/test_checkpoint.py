"""Checkpoints: kill -9 and resume, a kill inside a save, resharding, refusal, export of a checkpoint.

Every resumed run must end with the weights of an uninterrupted run, bit for bit (CPU, same
world size). Runs are short and small (64-token sequences, 2 per batch) to keep the file fast.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_same_weights, compose_config, final_weights, run_launcher, run_launcher_killed_in_save
from transformers import AutoModelForCausalLM

from launcher.cli.app import run_task
from launcher.data.sampler import ResumableDistributedSampler
from launcher.errors import ConfigError
from launcher.store.run_dir import latest_checkpoint

SMALL = ["train.max_seq_len=64", "data.train_bs=2", "data.eval_bs=4", "train.max_eval_batches=1",
         "train.max_steps=6", "train.logging_steps=2", "train.checkpointing_enabled=true", "train.save_steps=2"]


def checkpoint(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"checkpoint-{step:08d}"


def logged_steps(output_dir: Path) -> list:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "eval_loss" in r) for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run (in-process): the result every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run_task(compose_config([*SMALL, f"output_dir={out}"]))
    return out


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_position_is_a_prefix_of_the_permutation_for_any_world_size(shuffle):
    size, consumed = 37, 12  # 12 samples taken by 2 ranks (3 batches of 2 each)
    order = list(ResumableDistributedSampler(size, 1, 0, seed=3, shuffle=shuffle))
    assert (order == list(range(size))) != shuffle  # data.shuffle=false: the data's own order
    taken = []
    for rank in range(2):
        sampler = ResumableDistributedSampler(size, 2, rank, seed=3, shuffle=shuffle)
        taken += list(sampler)[: consumed // 2]
    assert sorted(taken) == sorted(order[:consumed])
    rest = []
    for rank in range(3):  # resumed on 3 ranks
        sampler = ResumableDistributedSampler(size, 3, rank, seed=3, shuffle=shuffle)
        sampler.set_position(0, consumed)
        assert len(sampler) == (size - consumed) // 3
        rest += list(sampler)
    assert sorted(rest) == sorted(order[consumed : consumed + len(rest)])
    assert not set(rest) & set(taken)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_data_shuffle_false_trains_in_the_data_order_and_resumes_exactly(tmp_path, reference):
    from datasets import Dataset

    from launcher.data.loaders import train_loader
    from launcher.distributed import World

    cfg = compose_config(["data.shuffle=false", "data.train_bs=2"])
    rows = Dataset.from_dict({"row": list(range(7))})
    loader = train_loader(rows, cfg, World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu")), lambda b: b)
    for epoch in range(2):
        loader.sampler.set_position(epoch, 0)
        assert [[int(r["row"]) for r in batch] for batch in loader] == [[0, 1], [2, 3], [4, 5]]
    loader.sampler.set_position(1, 4)
    assert [[int(r["row"]) for r in batch] for batch in loader] == [[4, 5]]

    ordered = tmp_path / "ordered"
    run_task(compose_config([*SMALL, "data.shuffle=false", f"output_dir={ordered}"]))
    resumed = tmp_path / "resumed"
    run_task(compose_config([*SMALL, "data.shuffle=false", f"resume={checkpoint(ordered, 4)}", f"output_dir={resumed}"]))
    assert_same_weights(final_weights(resumed), final_weights(ordered))
    assert not torch.equal(final_weights(ordered)["lm_head.weight"], final_weights(reference)["lm_head.weight"])


@pytest.mark.slow
def test_a_kill_inside_a_save_then_a_kill_9_mid_run_then_the_same_command_ends_with_the_same_weights(
        tmp_path, reference):
    out = tmp_path / "run"
    args = [*SMALL, f"output_dir={out}"]

    # 1. Killed (SIGKILL) inside the save of step 4: the shards are there, the marker is not.
    killed = run_launcher_killed_in_save(4, args, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    partial = out / "checkpoints" / ".checkpoint-00000004.partial"
    assert (partial / ".metadata").is_file() and not (partial / "COMPLETE").exists()
    assert latest_checkpoint(out) == checkpoint(out, 2)

    # 2. The same command resumes from step 2; kill -9 from outside once it has saved step 4 again.
    process = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while not (checkpoint(out, 4) / "COMPLETE").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert resumed_step(process.stdout.read()) == 2
    assert not partial.exists() and not (out / "final-model").exists()

    # 3. The same command again: resumes from step 4 (or 6, had the kill come late) and finishes.
    result = run_launcher(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert resumed_step(result.stdout) in (4, 6)
    assert_same_weights(final_weights(out), final_weights(reference))
    assert logged_steps(out) == logged_steps(reference)  # nothing logged twice, nothing missing
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000004", "checkpoint-00000006"]


def resumed_step(stdout: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith("hydralm: resuming from"))
    return int(line.split("(step ")[1].split(",")[0])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_full_shard_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    def torchrun(out, killed_in_save_of=None):
        program = ["-m", "launcher"] if killed_in_save_of is None else [str(ROOT / "tests" / "kill_in_save.py"),
                                                                        str(killed_in_save_of)]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", *program,
                   "sharding=full_shard", *SMALL, f"output_dir={out}"]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})

    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    assert torchrun(uninterrupted).returncode == 0
    assert torchrun(interrupted, killed_in_save_of=4).returncode != 0
    assert latest_checkpoint(interrupted) == checkpoint(interrupted, 2)
    shutil.copytree(checkpoint(interrupted, 2), tmp_path / "two-rank-checkpoint")
    result = torchrun(interrupted)
    assert result.returncode == 0, result.stderr
    assert resumed_step(result.stdout) == 2
    assert_same_weights(final_weights(interrupted), final_weights(uninterrupted))

    # The same checkpoint resumed by one process: DCP reshards, the data position is in global samples.
    resharded = tmp_path / "resharded"
    cfg = compose_config([*SMALL, f"resume={tmp_path / 'two-rank-checkpoint'}", f"output_dir={resharded}"])
    summary = run_task(cfg)
    assert summary["steps"] == 6
    state = json.loads((checkpoint(resharded, 4) / "trainer_state.json").read_text())
    # 2 steps x 2 ranks x 2 sequences before the resume, then 2 steps x 1 rank x 2 sequences.
    assert state["progress"]["epoch_samples"] == 8 + 4 and state["world_size"] == 1
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]


def test_a_checkpoint_from_another_model_is_refused_naming_what_differs(tmp_path, reference):
    cfg = compose_config([*SMALL, f"resume={checkpoint(reference, 4)}", "model.config.hidden_size=128",
                          f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model\.config\.hidden_size: 192 in the checkpoint, 128 now"):
        run_task(cfg)


@pytest.mark.parametrize("override, message", [("train.save_steps=0", "train.save_steps=0 must be >= 1"),
                                               ("train.keep_last_n=0", "train.keep_last_n=0 must be >= 1")])
def test_checkpoint_keys_are_checked(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_task(compose_config([override, f"output_dir={tmp_path}"]))


@pytest.mark.parametrize("resume", ["/nonexistent/checkpoint", "PARTIAL"])
def test_resume_must_name_a_complete_checkpoint(tmp_path, resume):
    if resume == "PARTIAL":
        resume = tmp_path / ".checkpoint-00000004.partial"
        resume.mkdir()
    with pytest.raises(ConfigError, match="resume="):
        run_task(compose_config([f"resume={resume}", f"output_dir={tmp_path}"]))


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_export_of_training_checkpoints_reloads_with_the_trained_logits(tmp_path, reference):
    from launcher.distributed import distributed
    from launcher.model.modeling import load_tokenizer
    from launcher.training.checkpoint import load_model_weights
    from launcher.training.export import save_hf_model
    from launcher.training.trainer import build_training_model

    # The last checkpoint (step 6) holds the final weights: its export equals final-model.
    run_task(compose_config(["task=export", f"checkpoint={checkpoint(reference, 6)}", f"output_dir={tmp_path / 'last'}"]))
    assert_same_weights(final_weights(tmp_path / "last"), final_weights(reference))

    # An intermediate checkpoint, exported in many small shards (bounded gather), reloads with its logits.
    cfg = compose_config([*SMALL, f"output_dir={tmp_path}"])
    probe = torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(0))
    with distributed() as world:
        tokenizer = load_tokenizer(cfg.model)
        model = build_training_model(cfg, tokenizer, world)
        load_model_weights(model, checkpoint(reference, 4))
        model.eval()
        with torch.no_grad():
            expected = model(input_ids=probe).logits
        save_hf_model(model, tokenizer, tmp_path / "sharded", world, max_shard_bytes=2_000_000)
    files = {p.name for p in (tmp_path / "sharded").iterdir()}
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 3
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, expected, rtol=0, atol=1e-5)
    final = AutoModelForCausalLM.from_pretrained(reference / "final-model").eval()
    with torch.no_grad():  # step 4 is not the final model: the probe tells them apart
        assert not torch.allclose(final(input_ids=probe).logits, expected, atol=1e-3)

    # evaluate reads training checkpoints too: it reproduces the eval loss logged at step 4.
    result = run_task(compose_config(["task=evaluate", f"checkpoint={checkpoint(reference, 4)}", *SMALL[:4],
                                      f"output_dir={tmp_path / 'eval'}"]))
    logged = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    step4_eval = next(r["eval_loss"] for r in logged if r["step"] == 4 and "eval_loss" in r)
    assert result["eval_loss"] == pytest.approx(step4_eval, abs=1e-5)
