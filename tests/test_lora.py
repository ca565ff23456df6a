"""LoRA (peft=lora) under FSDP2: only adapters train, and the exported adapter directory (and the
merged model) reproduce the trained model's logits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (QUICK, ROOT, assert_rejected_before_any_work, assert_same_weights, compose_config, final_weights,
                      run_launcher, run_launcher_killed_in_save)
from peft import PeftModel
from transformers import AutoModelForCausalLM
from wandb_records import offline_run

from launcher.cli.app import run_task
from launcher.errors import ConfigError

SECRET = "hydralm-test-secret-4f9a"


def _logits(model, probe):
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe).logits


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_lora_trains_only_adapters_and_its_export_reproduces_the_logits(tmp_path):
    from launcher.cli.validate import check_config
    from launcher.data.loaders import train_loader
    from launcher.distributed import distributed, seed_everything
    from launcher.model.lora import parameter_counts, reload_lora_model, trainable_parameters, trainable_state_dict
    from launcher.model.modeling import load_tokenizer
    from launcher.training.export import merged_dir, save_lora_adapter
    from launcher.training.optim import build_optimizer
    from launcher.training.trainer import build_training_model, optimizer_step
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from tasks.train import LanguageModeling

    cfg = compose_config(["peft=lora", "peft.r=4", "peft.target_modules=[q_proj,v_proj,down_proj]",
                          "export.merge_lora=true", f"output_dir={tmp_path}"])
    check_config(cfg)
    with distributed() as world:
        seed_everything(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model)
        task = LanguageModeling(cfg)
        loader = train_loader(task.datasets(tokenizer, world)["train"], cfg, world, task.collator(tokenizer))
        model = build_training_model(cfg, tokenizer, world, tmp_path)
        trainable, total = parameter_counts(model)
        assert 0 < trainable < 0.02 * total
        # 4 layers x (q, v: 4x(192+192); down: 4x(512+192)) adapter weights
        assert trainable == 4 * (2 * 4 * (192 + 192) + 4 * (512 + 192))
        params = dict(model.named_parameters())
        adapters = {n for n, p in params.items() if p.requires_grad}
        assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
        optimizer = build_optimizer(trainable_parameters(model), cfg.optimizer)
        assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable
        frozen_name = next(n for n in params if n.endswith("q_proj.base_layer.weight"))
        frozen_before = _full(params[frozen_name]).clone()

        batches = iter(loader)
        for _ in range(3):
            optimizer_step(model, optimizer, [next(batches)], task, world)
        assert torch.equal(_full(params[frozen_name]), frozen_before)
        lora_b = next(p for n, p in params.items() if ".lora_B." in n)
        assert _full(lora_b).abs().sum() > 0  # peft starts B at zero: it trained

        probe = next(batches)["input_ids"][:2]
        expected = _logits(model, probe)

        # The checkpoint hook: adapters out, adapters zeroed, adapters back in (with torch's loader).
        state = trainable_state_dict(model)
        assert set(state) == adapters
        into_model = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, {k: torch.zeros_like(v) for k, v in state.items()}, options=into_model)
        assert not torch.allclose(_logits(model, probe), expected, atol=1e-4)
        set_model_state_dict(model, state, options=into_model)
        torch.testing.assert_close(_logits(model, probe), expected, rtol=0, atol=1e-5)

        save_lora_adapter(model, tokenizer, tmp_path / "final-model", world, merge=True)

    adapter_dir = tmp_path / "final-model"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter_dir.iterdir()}
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base-model").resolve())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    # A researcher's reload: the recorded base (a random init, so saved next to the adapter) + adapters.
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base-model")
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, adapter_dir), probe), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(reload_lora_model(adapter_dir), probe), expected, rtol=0, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir(adapter_dir))
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, probe), expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_two_process_full_shard_lora_with_wandb_and_tensorboard(tmp_path):
    """torchrun, 2 ranks, full_shard + LoRA + both loggers, with an API key on the command line."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "launcher",
               "sharding=full_shard", "peft=lora", "export.merge_lora=true", "logger=[wandb,tensorboard]",
               f"+logger.wandb.settings.api_key={SECRET}", "train.peak_flops_per_device=1e12", *QUICK,
               f"output_dir={out}", f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 < summary["trainable_params"] < 0.02 * summary["total_params"]
    assert "M parameters trainable" in (out / "hydralm.log").read_text()
    assert "step 4/4: train loss " in result.stdout  # no terminal: plain progress lines, not a bar

    # The adapters gathered from the two shards give the model the merged export holds.
    from launcher.model.lora import reload_lora_model

    probe = torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(out / "final-model-merged")
    adapted = reload_lora_model(out / "final-model")
    base = AutoModelForCausalLM.from_pretrained(out / "base-model")
    torch.testing.assert_close(_logits(merged, probe), _logits(adapted, probe), rtol=0, atol=1e-4)
    assert not torch.allclose(_logits(base, probe), _logits(adapted, probe), atol=1e-4)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    for key in ("grad_norm", "tokens_per_s", "tokens_per_s_per_device", "peak_mem_gib", "time_s"):
        assert all(r[key] > 0 for r in train_rows), key
    assert all(r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2) for r in train_rows)
    flops_per_token = summary["mfu_flops_per_token"]
    assert all(r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * flops_per_token / 1e12) for r in train_rows)

    # wandb (offline): the composed config and the same metric values, one run id kept in output_dir.
    run = offline_run(out)
    assert run["run"].run_id == (out / "wandb_run_id").read_text().strip()
    assert run["config"]["peft"]["name"] == "lora" and run["config"]["sharding"]["strategy"] == "FULL_SHARD"
    assert run["config"]["logger"]["wandb"]["settings"]["api_key"] == "***"
    logged = {h["_step"]: h for h in run["history"]}
    for row in train_rows:
        for key in ("train_loss", "grad_norm", "lr", "tokens_seen", "tokens_per_s"):
            assert logged[row["step"]][key] == pytest.approx(row[key]), key
    assert logged[4]["eval_loss"] == pytest.approx(summary["final_eval_loss"])

    # TensorBoard: the same scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    losses = {e.step: e.value for e in events.Scalars("train_loss")}
    assert losses == {r["step"]: pytest.approx(r["train_loss"]) for r in train_rows}

    # The key is nowhere: not in the logs, dumps, metrics, wandb's files, nor the console.
    assert SECRET not in result.stdout + result.stderr
    leaks = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks
    assert f"api_key={SECRET}" not in (out / ".hydra" / "overrides.yaml").read_text()
    assert "api_key=***" in (out / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["peft=lora", "peft.target_modules=[qkv_proj]"], "peft.target_modules=['qkv_proj'] cannot be adapted"),
        (["peft=lora", "peft.r=0"], "peft.r=0 must be >= 1"),
        (["peft=lora", "peft.lora_dropout=1.5"], "peft.lora_dropout=1.5 must be in [0, 1)"),
        (["peft=lora", "peft.task_type=SEQ_CLS"], "peft.task_type='SEQ_CLS' is not valid; choose one of: CAUSAL_LM"),
        (["peft=lora", "peft.inference_mode=true"], "peft.inference_mode=true freezes the adapters"),
        (["export.merge_lora=true"], "export.merge_lora=true needs peft=lora"),
        (["logger=wandb", "+logger.wandb.projcet=x"], "logger.wandb.projcet is not an argument of wandb.init"),
        (["logger=wandb", "+logger.wandb.config.a=1"], "logger.wandb.config is not an argument of wandb.init"),
    ],
)
def test_bad_peft_and_logger_config_is_named_before_any_work(overrides, message, tmp_path):
    assert_rejected_before_any_work(overrides, message, tmp_path)


def test_target_modules_error_lists_the_model_modules(tmp_path):
    with pytest.raises(ConfigError, match="linear modules: .*q_proj"):
        run_task(compose_config(["peft=lora", "peft.target_modules=[nope]", f"output_dir={tmp_path}"]))


def test_evaluating_an_adapter_directory_points_to_the_merged_model(tmp_path):
    adapter_dir = tmp_path / "final-model"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a LoRA adapter directory.*final-model-merged"):
        run_task(compose_config(["task=evaluate", f"checkpoint={adapter_dir}", f"output_dir={tmp_path / 'out'}"]))


def test_model_flops_count_weight_gradients_only_for_what_trains():
    from types import SimpleNamespace

    from launcher.training.metrics import flops_per_token

    config = SimpleNamespace(num_hidden_layers=4, hidden_size=192)
    attention = 12 * 4 * 192 * 256
    total, embedding = 3_000_000, 800_000
    full = flops_per_token(config, total, total, embedding, seq_len=256)
    assert full == 6 * (total - embedding) + attention  # 6N over the matmul weights
    lora = flops_per_token(config, total + 10_000, 10_000, embedding, seq_len=256)
    assert lora == 4 * (total + 10_000 - embedding) + 2 * 10_000 + attention


def _full(parameter: torch.Tensor) -> torch.Tensor:
    """The whole tensor, whether FSDP2 sharded it (DTensor) or not (single-process fp32)."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter.detach()


@pytest.mark.slow
def test_lora_checkpoints_hold_only_adapters_and_a_killed_run_resumes_to_the_same_adapters(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    common = ["peft=lora", "train.max_steps=6", "train.logging_steps=2", "train.max_eval_batches=1",
              "train.checkpointing_enabled=true", "train.save_steps=2", "data.train_bs=4"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert run_launcher([*common, f"output_dir={reference}"], cwd=tmp_path).returncode == 0
    killed = run_launcher_killed_in_save(4, [*common, f"output_dir={resumed}"], cwd=tmp_path)
    assert killed.returncode != 0  # killed inside the step-4 save: step 2 is the latest checkpoint
    again = run_launcher([*common, f"output_dir={resumed}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "checkpoint-00000002" in again.stdout

    saved = FileSystemReader(str(reference / "checkpoints" / "checkpoint-00000006")).read_metadata()
    model_keys = [k for k in saved.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)  # no base weights

    adapters = "adapter_model.safetensors"
    assert_same_weights(final_weights(resumed, adapters), final_weights(reference, adapters))


@pytest.mark.slow
def test_a_lora_training_checkpoint_exports_and_evaluates_as_its_final_model(tmp_path):
    """A peft=lora checkpoint holds the adapters only: task=export and task=evaluate rebuild its
    base (the run's base-model/, a random init here) and load the adapters onto it."""
    run = tmp_path / "run"
    trained = run_launcher(["peft=lora", *QUICK, "train.checkpointing_enabled=true", "train.save_steps=4",
                            f"output_dir={run}"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    checkpoint = run / "checkpoints" / "checkpoint-00000004"  # the last step: the final model's weights

    out = tmp_path / "exported"
    exported = run_launcher(["task=export", f"checkpoint={checkpoint}", "export.merge_lora=true", f"output_dir={out}"],
                            cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    adapters = "adapter_model.safetensors"
    assert_same_weights(final_weights(out, adapters), final_weights(run, adapters))
    config = json.loads((out / "final-model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run / "base-model").resolve())
    # The merged export against peft's own reload of the run's final adapters on their base.
    probe = torch.tensor([[1, 57, 300, 9, 2048, 4]])
    expected = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base-model"),
                                                 run / "final-model"), probe)
    merged = AutoModelForCausalLM.from_pretrained(out / "final-model-merged")
    torch.testing.assert_close(_logits(merged, probe), expected, rtol=0, atol=1e-4)

    scored = run_launcher(["task=evaluate", f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'scores'}"],
                          cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    loss = json.loads((tmp_path / "scores" / "eval.json").read_text())["eval_loss"]
    assert loss == pytest.approx(json.loads((run / "summary.json").read_text())["final_eval_loss"], rel=1e-5)


def test_a_lora_checkpoint_whose_random_init_base_is_gone_is_refused_in_one_line(tmp_path):
    """Its adapters apply to the random init the run saved as base-model/: a checkpoint copied out
    of its run cannot be rebuilt, and says so before any model loads."""
    from launcher.model.task_model import lora_base

    checkpoint = tmp_path / "elsewhere" / "checkpoint-00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"fingerprint": {"peft.name": "lora", "model.path": None}}))
    with pytest.raises(ConfigError, match="random init that its run saved as .*base-model, which is not there"):
        lora_base(checkpoint)
