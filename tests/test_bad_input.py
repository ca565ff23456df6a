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
        (["train.loss=chunked_cross_entropy", "model.config.model_type=gemma2"],
         "train.loss=chunked_cross_entropy supports model types llama, mistral"),
    ],
)
def test_bad_values_are_named_before_any_work(overrides, message, tmp_path):
    assert_rejected_before_any_work(overrides, message, tmp_path)


def test_seed_spelling_aliases_are_accepted():
    from launcher.validate import check_config

    cfg = compose_config(["scheduler.name=plataeu-with-warmup", "sharding.strategy=full_shard"])
    check_config(cfg)
    assert cfg.scheduler.name == "plateau_with_warmup" and cfg.sharding.strategy == "FULL_SHARD"


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
