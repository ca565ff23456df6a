"""End-to-end: `python -m launcher` in subprocesses, and the task functions called in-process."""

import json

import pytest
import torch
from conftest import QUICK, compose_config, run_in_fresh_python, run_launcher, training_parts
from transformers import AutoModelForCausalLM

from launcher.cli.app import run_task

METRIC_KEYS = {"step", "epoch", "train_loss", "lr", "tokens_seen", "tokens_per_s"}


@pytest.mark.slow
def test_launcher_trains_learns_and_exports_a_reloadable_model(tmp_path):
    out = tmp_path / "run"
    result = run_launcher(["train.max_steps=8", "train.logging_steps=4", f"output_dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5
    assert "final model:" in result.stdout and "tokens/s" in result.stdout
    job_log = (out / "hydralm.log").read_text()  # the summary is kept with the run, not only printed
    assert "hydralm: trained 8 steps" in job_log and f"final model: {out / 'final-model'}" in job_log

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8] and [r["step"] for r in eval_rows] == [0, 4, 8]
    assert all(METRIC_KEYS <= set(r) for r in train_rows)
    assert train_rows[-1]["tokens_seen"] == summary["tokens_seen"] > 0

    model_dir = out / "final-model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.get_input_embeddings().num_embeddings % 64 == 0

    # The exported weights are the trained weights: evaluating them reproduces the final eval loss.
    reloaded = run_task(compose_config(["task=evaluate", f"checkpoint={model_dir}", f"output_dir={tmp_path / 'eval'}"]))
    assert abs(reloaded["eval_loss"] - summary["final_eval_loss"]) < 1e-4


@pytest.mark.slow
def test_evaluate_on_a_runs_checkpoint_uses_the_runs_data_and_settings(tmp_path):
    """`task=evaluate checkpoint=<run>/final-model`, typed with nothing else, scores the run's own
    eval split (its sequence length, batch size and batch limit, none of them the defaults) and
    reproduces the run's final eval loss; eval.json lands in the run, whose Hydra record stays."""
    run = tmp_path / "run"
    trained = run_launcher(["train.max_seq_len=64", "data.train_bs=2", "data.eval_bs=4", "train.max_eval_batches=2",
                            "train.max_steps=4", "train.logging_steps=4", "train.checkpointing_enabled=true",
                            "train.save_steps=4", f"output_dir={run}"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((run / "summary.json").read_text())
    record = (run / ".hydra" / "config.yaml").read_text()

    result = run_launcher(["task=evaluate", f"checkpoint={run / 'final-model'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scored = json.loads((run / "eval.json").read_text())
    assert scored["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert scored["data"]["source"] == "pydoc" and scored["data"]["eval_bs"] == 4 and scored["split"] == "eval"
    assert scored["eval_batches"] == 2 and 0 < scored["eval_tokens"] <= 2 * 4 * 64
    assert scored["settings_from"] == str(run / ".hydra" / "config.yaml")
    assert f"-> {run / 'eval.json'}" in result.stdout
    assert (run / ".hydra" / "config.yaml").read_text() == record

    # A training checkpoint too; a key on the command line wins over the run's; output_dir is honoured.
    out = tmp_path / "scores"
    result = run_launcher(["task=evaluate", f"checkpoint={run / 'checkpoints' / 'checkpoint-00000004'}",
                           "train.max_eval_batches=1", f"output_dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scored = json.loads((out / "eval.json").read_text())
    assert scored["eval_batches"] == 1 and scored["data"]["eval_bs"] == 4 and 0 < scored["eval_tokens"] <= 4 * 64


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_exported_model_gives_the_in_memory_logits(tmp_path):
    from launcher.distributed import distributed
    from launcher.training.export import save_hf_model
    from launcher.training.trainer import optimizer_step

    cfg = compose_config([f"output_dir={tmp_path}"])
    with distributed() as world:
        tokenizer, task, batches, model, optimizer = training_parts(cfg, world)
        for _ in range(2):
            optimizer_step(model, optimizer, [next(batches)], task, world)
        probe = next(batches)["input_ids"]
        model.eval()
        with torch.no_grad():
            expected = model(input_ids=probe).logits
        save_hf_model(model, tokenizer, tmp_path / "final-model", world)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final-model").eval()
    with torch.no_grad():
        actual = reloaded(input_ids=probe).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sweep_runs_one_job_per_point_in_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_launcher(
        ["-m", "optimizer.lr=1e-3,3e-3", *QUICK, f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    for point, lr in (("0", 1e-3), ("1", 3e-3)):
        job_dir = sweep / point
        assert (job_dir / "final-model" / "model.safetensors").is_file()
        assert (job_dir / "metrics.jsonl").is_file()
        config = (job_dir / ".hydra" / "config.yaml").read_text()
        assert f"lr: {lr}" in config or f"lr: {lr:g}" in config


@pytest.mark.slow
def test_cfg_job_prints_the_config_without_importing_torch(tmp_path):
    result = run_in_fresh_python(["--cfg", "job", "train.epochs=3"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epochs: 3" in result.stdout and "_target_: torch.optim.AdamW" in result.stdout
    assert result.stdout.strip().endswith("NO_TORCH")
    assert not (tmp_path / "outputs").exists()
