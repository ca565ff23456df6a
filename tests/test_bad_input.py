"""Bad input fails fast: one readable line, a non-zero exit, and no result on disk."""

import pytest
from conftest import assert_rejected_before_any_work, compose_config, run_launcher


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["scheduler.warmup_ratio=1.5"], "scheduler.warmup_ratio=1.5 must be in [0, 1]"),
        (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps=0 must be >= 1"),
        (["model=llama3_8b", "model.path=/no/such/dir"], "model.path=/no/such/dir does not exist"),
        (["train.max_seq_len=2048"], "train.max_seq_len=2048 exceeds the model's max_position_embeddings=1024"),
        (["+optimizer.lrr=0.1"], "optimizer.lrr is not a parameter of torch.optim.AdamW; valid parameters: lr,"),
        (["scheduler.name=cosinus"], "scheduler.name='cosinus' is not valid; choose one of: linear, cosine"),
        (["sharding.strategy=ZERO3"], "sharding.strategy='ZERO3' is not valid; choose one of: NO_SHARD, FULL_SHARD"),
        (["model.attention=flash"], "model.attention='flash' is not valid"),
        (["model.attention=flash_attention_2"], "model.attention=flash_attention_2 needs a CUDA device and the flash_attn package"),
        (["sharding.backend=nccl"], "sharding.backend=nccl needs CUDA devices"),
        (["sharding.cpu_offload=true"], "sharding.cpu_offload=true offloads GPU memory to the host; it needs CUDA"),
        (["scheduler=cosine_with_restarts", "+scheduler.kwargs.num_cyclez=2"], "scheduler=cosine_with_restarts cannot be built"),
        (["data=preprocessed", "data.train_ds=/no/train", "data.eval_ds=/no/eval"], "data.train_ds=/no/train does not exist"),
        (["task=evaluate", "checkpoint=/no/model"], "checkpoint=/no/model does not exist"),
        (["train.loss=fused"], "train.loss='fused' is not valid; choose one of: cross_entropy, chunked_cross_entropy"),
        (["train.loss_chunk_size=0"], "train.loss_chunk_size=0 must be >= 1"),
        (["train.loss=chunked_cross_entropy", "model.config.model_type=gemma2", "model.attention=eager"],
         "train.loss=chunked_cross_entropy supports model types llama, mistral"),
    ],
)
def test_bad_values_are_named_before_any_work(overrides, message, tmp_path):
    assert_rejected_before_any_work(overrides, message, tmp_path)


def test_seed_spelling_aliases_are_accepted():
    from launcher.cli.validate import check_config

    cfg = compose_config(["scheduler.name=plataeu-with-warmup", "sharding.strategy=full_shard"])
    check_config(cfg)
    assert cfg.scheduler.name == "plateau_with_warmup" and cfg.sharding.strategy == "FULL_SHARD"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,expected",
    [
        (["optimizer=adamx"], ["optimizer", "adamw", "sgd"]),
        (["train.epochz=2"], ["epochz"]),
        (["train.epochs=abc"], ["train.epochs", "abc"]),
        (["scheduler.warmup_ratio=-0.1"], ["hydralm: error: scheduler.warmup_ratio=-0.1 must be in [0, 1]"]),
        (["train.max_seq_len=4096"], ["hydralm: error: train.max_seq_len=4096 exceeds"]),
        (["model=mistral_7b"], ["hydralm: error: model.path=/model-weights/Mistral-7B-v0.1 does not exist"]),
    ],
)
def test_cli_reports_one_readable_error(args, expected, tmp_path):
    result = run_launcher([*args, f"output_dir={tmp_path / 'out'}"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 15, result.stderr  # Hydra lists options and search path
    assert not (tmp_path / "out" / "final-model").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()


# Issue 13 item 7: values that failed late (after data and model were built) or with a raw error.
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer.lr=abc"], "optimizer.lr='abc' does not match torch.optim.AdamW's lr: float | torch.Tensor"),
        (["optimizer.lr=-1"], "optimizer.lr=-1 is refused by torch.optim.AdamW: Invalid learning rate: -1"),
        (["optimizer.lr=nan"], "optimizer.lr=nan must be a finite number"),
        (["optimizer=sgd", "optimizer.lr=nan"], "optimizer.lr=nan must be a finite number"),  # SGD accepts nan itself
        (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9] does not match torch.optim.AdamW's betas: tuple["),
        (["optimizer=sgd", "+optimizer.nesterov=true", "optimizer.momentum=0"],
         "optimizer.nesterov=True is refused by torch.optim.SGD: Nesterov momentum requires a momentum"),
        (["train.seed=-1"], "train.seed=-1 must be in [0, 2**32 - 1]"),
        (["model.pad_vocab_to_multiple_of=0"], "model.pad_vocab_to_multiple_of=0 must be >= 1"),
        (["scheduler=cosine_with_restarts", "+scheduler.kwargs.num_cycles=2.5"],
         "scheduler=cosine_with_restarts cannot be built: scheduler.kwargs.num_cycles=2.5 does not match "
         "get_cosine_with_hard_restarts_schedule_with_warmup's num_cycles: int"),
        (["scheduler=constant", "+scheduler.kwargs.power=2"],  # was silently ignored
         "scheduler=constant cannot be built: scheduler.kwargs.power is not an argument of get_constant_schedule"),
        (["scheduler=plateau_with_warmup", "+scheduler.kwargs.mode=minimum"],
         "scheduler.kwargs.mode='minimum' does not match torch.optim.lr_scheduler.ReduceLROnPlateau's mode"),
    ],
)
def test_late_and_raw_errors_are_one_line_before_any_work(overrides, message, tmp_path):
    assert_rejected_before_any_work(overrides, message, tmp_path)


def test_a_misspelt_optimizer_key_names_the_closest_parameter(tmp_path):
    assert_rejected_before_any_work(["+optimizer.weight_decy=0.1"], "valid parameters: lr, betas, eps, weight_decay, "
                                    "amsgrad, maximize, foreach, capturable, differentiable, fused; did you mean "
                                    "weight_decay?", tmp_path)


@pytest.mark.parametrize(
    "output_dir,message",
    [
        ("", "output_dir='' is empty: name a directory"),
        ("{file}", "output_dir={file} is a file, not a directory"),
        ("{file}/run", "output_dir={file}/run is under a file ({file}), not a directory"),
        ("/proc/hydralm-run", "output_dir=/proc/hydralm-run cannot be written: /proc does not accept new directories"),
    ],
)
def test_an_output_dir_that_cannot_hold_a_run_is_refused(output_dir, message, tmp_path):
    from launcher.cli.validate import check_config
    from launcher.errors import ConfigError

    file = tmp_path / "notes.txt"
    file.write_text("not a directory")
    cfg = compose_config([f"output_dir='{output_dir.format(file=file)}'"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert message.format(file=file) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the writability probe left nothing


def test_typed_binding_follows_the_signature():
    from typing import Literal, Optional

    from launcher.errors import ConfigError, check_arguments

    def target(rate: float, steps: int = 1, flag: Optional[bool] = None, pair: tuple[float, float] = (0.0, 1.0),
               mode: Literal["min", "max"] = "min", names: "list[str] | None" = None, anything=None):
        """`names` is a string annotation, as under `from __future__ import annotations`."""

    good = {"rate": 1, "steps": 3, "flag": None, "pair": [0.5, 2], "mode": "max", "names": ["a"], "anything": {"x": 1}}
    check_arguments("opt", good, target, "target")
    for key, value in [("rate", "abc"), ("rate", True), ("steps", 2.5), ("flag", "yes"), ("pair", [1.0]),
                       ("pair", [1.0, "x"]), ("mode", "mean"), ("names", "a")]:
        with pytest.raises(ConfigError, match=rf"^opt\.{key}=.* does not match target's {key}: "):
            check_arguments("opt", {**good, key: value}, target, "target")
    with pytest.raises(ConfigError, match=r"opt\.steep is not an argument of target; .* did you mean steps\?$"):
        check_arguments("opt", {"steep": 1}, target, "target")
