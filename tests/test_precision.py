"""train.precision, the device defaults (`auto` values) and the cpu_offload device mix.

The rule is checked against a hand-written table; the modes against the dtypes they promise and a
plain fp32 PyTorch loop; the cpu_offload fix with values on two devices (`meta` stands in for the
GPU, the host for the offloaded gradient norm), which the code before the fix refused.
"""

import importlib.util
import logging

import pytest
import torch
from conftest import assert_same_weights, compose_config, final_weights, run_launcher, training_parts

from launcher.model.device_defaults import Choices, Machine, apply_device_defaults, resolve

CUDA_BF16 = Machine(device="cuda", bf16=True, world_size=1)
CUDA_NO_BF16 = Machine(device="cuda", bf16=False, world_size=1)  # e.g. V100, T4
CPU = Machine(device="cpu", bf16=False, world_size=1)
ALL_AUTO = Choices(precision="auto", compile="auto", strategy="auto", attention="auto")
PACKED = Choices(precision="auto", compile="auto", strategy="auto", attention="auto", document_mask=True)
USER_SET = Choices(precision="bf16", compile=False, strategy="HYBRID_SHARD", attention="sdpa", document_mask=True)
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="train.precision=bf16_sr needs torchao (pip install 'hydralm[torchao]')")


@pytest.mark.parametrize("choices, machine, expected", [
    # (precision, compile, strategy, attention) the table in docs/precision.md promises
    (ALL_AUTO, CUDA_BF16, ("mixed", True, "NO_SHARD", "auto")),
    (ALL_AUTO, CUDA_NO_BF16, ("fp32", True, "NO_SHARD", "auto")),
    (ALL_AUTO, CPU, ("fp32", False, "NO_SHARD", "auto")),
    (ALL_AUTO, Machine("cuda", True, world_size=2), ("mixed", True, "FULL_SHARD", "auto")),
    (ALL_AUTO, Machine("cpu", False, world_size=2), ("fp32", False, "FULL_SHARD", "auto")),
    (PACKED, CUDA_BF16, ("mixed", True, "NO_SHARD", "flex_attention")),
    (PACKED, Machine("cuda", True, 1, flash_attn=True), ("mixed", True, "NO_SHARD", "auto")),  # flash: varlen
    (PACKED, CPU, ("fp32", False, "NO_SHARD", "auto")),  # no FlexAttention backward on CPU
    (USER_SET, Machine("cuda", True, world_size=2), ("bf16", False, "HYBRID_SHARD", "sdpa")),
    (USER_SET, CPU, ("bf16", False, "HYBRID_SHARD", "sdpa")),
    (Choices("fp32", True, "no_shard", "auto"), Machine("cuda", True, 4), ("fp32", True, "no_shard", "auto")),
], ids=["cuda-bf16", "cuda-no-bf16", "cpu", "cuda-2", "cpu-2", "packed-cuda", "packed-cuda-flash", "packed-cpu",
        "user-cuda-2", "user-cpu", "user-no-shard"])
def test_the_device_defaults_rule(choices, machine, expected):
    got = resolve(choices, machine)
    assert (got.precision, got.compile, got.strategy, got.attention) == expected


def test_auto_values_are_written_into_the_config_once_with_one_line(caplog):
    cfg = compose_config([])
    assert (cfg.train.precision, cfg.train.compile, cfg.sharding.strategy) == ("auto", "auto", "auto")
    line = apply_device_defaults(cfg, CPU)
    assert line == "hydralm: on cpu: precision=fp32 (auto), compile=false (auto), sharding=NO_SHARD (auto), attention=sdpa"
    assert (cfg.train.precision, cfg.train.compile, cfg.sharding.strategy) == ("fp32", False, "NO_SHARD")
    assert apply_device_defaults(cfg, CUDA_BF16) is None  # resolved: a second call changes nothing

    # compile=auto on a machine where torch.compile cannot run (here: CUDA asked of a CPU-only build)
    # falls back to eager with a one-line warning; the user's own choices are kept as given.
    cfg = compose_config(["train.precision=bf16_sr", "sharding=full_shard"])
    with caplog.at_level(logging.WARNING, logger="hydralm"):
        line = apply_device_defaults(cfg, CUDA_BF16 if not torch.cuda.is_available() else CPU)
    assert cfg.train.compile is False and cfg.train.precision == "bf16_sr" and cfg.sharding.strategy == "FULL_SHARD"
    if not torch.cuda.is_available():
        assert "compile=false (auto)" in line and "precision=bf16_sr," in line
        assert any("training eagerly" in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_adamw_runs_fused_on_cuda_unless_the_user_chose_or_another_optimizer_runs():
    """The rule of launcher/model/device_defaults.py `fuses_adamw`, with the resolved precision."""
    from launcher.model.device_defaults import fuses_adamw

    def fused(overrides, machine, precision="mixed"):
        return fuses_adamw(compose_config(overrides), machine, precision)

    assert fused([], CUDA_BF16) is True
    assert fused([], CPU, "fp32") is False  # CPU figures unchanged
    assert fused(["+optimizer.fused=false"], CUDA_BF16) is False  # the user's choice stands
    assert fused(["optimizer=sgd"], CUDA_BF16) is False
    assert fused(["sharding.cpu_offload=true"], CUDA_BF16) is False  # the update runs on the host
    assert fused([], CUDA_BF16, "bf16_sr") is False  # torchao's AdamW
    cfg = compose_config([])
    cfg.train.compile = False  # keep the compile probe out of this test
    line = apply_device_defaults(cfg, CUDA_BF16)
    assert cfg.optimizer.fused is True and line.endswith(", optimizer=fused AdamW (auto)")


# ---------------------------------------------------------------------- cpu_offload: two devices


def test_step_values_from_another_device_join_the_compute_devices_sums():
    """sharding.cpu_offload on CUDA: the gradient norm is computed on the host, the loss on the GPU.
    `meta` plays the GPU here; the code before the fix failed in FirstNonFinite.observe."""
    from launcher.distributed import World
    from launcher.training.metrics import Window
    from launcher.training.trainer import FirstNonFinite, on_device

    gpu = torch.device("meta")
    world = World(0, 0, 1, 1, gpu)
    loss, grad_norm = torch.ones((), device=gpu), torch.tensor(0.5)  # grad norm on the host
    nonfinite = FirstNonFinite(world)
    nonfinite.observe(1, loss, grad_norm)
    assert nonfinite.steps.device == gpu
    window = Window(("loss", "grad_norm"), gpu)
    window.add(loss=loss, grad_norm=grad_norm)
    assert window.values.device == gpu
    from torch.distributed.tensor import DTensor  # noqa: F401  (on_device also unwraps FSDP2's DTensor norm)
    assert on_device(grad_norm, gpu).device == gpu


def test_a_host_gradient_norm_still_flags_a_non_finite_step():
    from launcher.distributed import World
    from launcher.training.trainer import FirstNonFinite

    nonfinite = FirstNonFinite(World(0, 0, 1, 1, torch.device("cpu")))
    nonfinite.observe(3, torch.tensor(1.0), torch.tensor(float("inf")))
    nonfinite.observe(4, torch.tensor(float("nan")), torch.tensor(1.0))
    assert nonfinite.steps.tolist() == [4, 3]


# ---------------------------------------------------------------------- the modes on a tiny model


def _one_step(precision: str, steps: int = 1, extra=()):
    """hydralm's model, optimizer and `optimizer_step` for `steps` steps (CPU, tiny default model)."""
    from launcher.distributed import distributed
    from launcher.training.trainer import optimizer_step

    cfg = compose_config([f"train.precision={precision}", "train.max_seq_len=64", "data.train_bs=4", *extra])
    with distributed() as world:
        _, task, batches, model, optimizer = training_parts(cfg, world)
        losses = []
        for _ in range(steps):
            step = optimizer_step(model, optimizer, [next(batches)], task, world)
            losses.append(float(step.loss / step.weight))
        # the gradients' dtype: one more backward, without a step
        loss, _ = task.loss(model, {k: v for k, v in next(batches).items()})
        loss.backward()
        return model, optimizer, losses


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
@pytest.mark.parametrize("precision, weights, state", [
    ("fp32", torch.float32, torch.float32),
    ("mixed", torch.float32, torch.float32),  # fp32 master weights; FSDP2 computes in bf16
    ("bf16", torch.bfloat16, torch.bfloat16),
    pytest.param("bf16_sr", torch.bfloat16, torch.bfloat16, marks=needs_torchao),
])
def test_each_mode_keeps_weights_gradients_and_adamw_state_in_its_dtype(precision, weights, state):
    model, optimizer, _ = _one_step(precision)
    params = list(model.parameters())
    assert {_local(p).dtype for p in params} == {weights}
    assert {_local(p.grad).dtype for p in params} == {weights}
    moments = [_local(optimizer.state[p][name]) for p in params for name in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(params) and {m.dtype for m in moments} == {state}
    if precision == "bf16_sr":
        assert type(optimizer).__module__.startswith("torchao") and optimizer.bf16_stochastic_round
    if precision == "mixed":  # the forward computes in bf16: FSDP2's policy says so
        assert model._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_lora_adapters_follow_the_mode():
    model, optimizer, _ = _one_step("bf16", extra=["peft=lora"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {optimizer.state[p]["exp_avg"].dtype for p in trainable} == {torch.bfloat16}


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_bf16_training_follows_a_plain_fp32_loop():
    """Ten steps of pure bf16 against a plain PyTorch fp32 loop (same init, same batches): the
    losses agree within bf16's precision (rel 2%), and training moved the loss."""
    from launcher.data.loaders import train_loader
    from launcher.distributed import distributed, seed_everything
    from launcher.model.modeling import build_model, load_tokenizer
    from tasks.train import LanguageModeling

    steps = 10
    _, _, bf16_losses = _one_step("bf16", steps=steps)
    cfg = compose_config(["train.precision=fp32", "train.max_seq_len=64", "data.train_bs=4"])
    with distributed() as world:
        seed_everything(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model)
        task = LanguageModeling(cfg)
        loader = train_loader(task.datasets(tokenizer, world)["train"], cfg, world, task.collator(tokenizer))
        model = build_model(cfg.model, tokenizer, world)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                                      eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay)
        reference = []
        for batch, _ in zip(loader, range(steps)):
            logits = model(input_ids=batch["input_ids"]).logits.float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            reference.append(loss.item())
    torch.testing.assert_close(torch.tensor(bf16_losses), torch.tensor(reference), rtol=2e-2, atol=0)
    assert bf16_losses[-1] < bf16_losses[0] - 0.5


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", pytest.param("bf16_sr", marks=needs_torchao)])
def test_a_killed_bf16_run_resumes_to_the_uninterrupted_weights_in_bf16(tmp_path, precision):
    from conftest import run_launcher_killed_in_save

    small = [f"train.precision={precision}", "train.max_seq_len=64", "data.train_bs=2", "data.eval_bs=4",
             "train.max_eval_batches=1", "train.max_steps=6", "train.logging_steps=2",
             "train.checkpointing_enabled=true", "train.save_steps=2"]
    reference = run_launcher([*small, f"output_dir={tmp_path / 'reference'}"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    args = [*small, f"output_dir={tmp_path / 'resumed'}"]
    killed = run_launcher_killed_in_save(4, args, cwd=tmp_path)  # dies inside the save of step 4
    assert killed.returncode != 0
    resumed = run_launcher(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 2" in resumed.stdout
    weights = final_weights(tmp_path / "resumed")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # exported in the weights' dtype
    assert_same_weights(weights, final_weights(tmp_path / "reference"))
