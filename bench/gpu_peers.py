"""The GPU checklist's peers: the same model shape, batch and step count as hydralm's throughput
items, trained WITHOUT hydralm, so `ratio hydralm/<peer>` says what hydralm adds or costs.

    bare_fsdp2             plain PyTorch: fully_shard on each decoder layer and the root,
                           MixedPrecisionPolicy(bf16 compute, fp32 reduce), fused AdamW, clip 1.0
    bare_fsdp2_compile     the same with torch.compile on each decoder layer (torchtitan's recipe)
    hf_trainer             transformers.Trainer, bf16=True, optim=adamw_torch_fused, clip 1.0

Each runs inside one checklist item's process (bench/gpu_check.py starts them); nothing here imports
hydralm's training code. The figures use the same FLOP count as hydralm (launcher.training.metrics),
so MFU compares like with like.
"""

import math
import os
import time

import torch

OPTIMIZER = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
MAX_GRAD_NORM = 1.0


def bare_fsdp2(spec: dict, compile_layers: bool) -> dict:
    """The loop a PyTorch user writes by hand around FSDP2."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = _device()
    dist.init_process_group(spec["backend"], **({"device_id": device} if device.type == "cuda" else {}))
    try:
        model = _model(spec, device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            if compile_layers:
                layer.compile()  # in place: the module stays a LlamaDecoderLayer for fully_shard
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        optimizer = torch.optim.AdamW(model.parameters(), fused=True, **OPTIMIZER)

        def step(batch):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        seconds, loss = _timed(spec, device, step)
        return _figures(spec, model, device, seconds, loss.item())
    finally:
        dist.destroy_process_group()


def hf_trainer(spec: dict) -> dict:
    """What a transformers user runs: Trainer with bf16 autocast and fused AdamW."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    device = _device()
    model = _model(spec, device)
    rows = [row for batch in _batches(spec, model.config.vocab_size) for row in batch]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            return {"input_ids": rows[index], "labels": rows[index]}

    marks = {}

    class Clock(TrainerCallback):  # the same window as the other items: after the warm-up steps
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (spec["warmup"], spec["warmup"] + spec["steps"]):
                _synchronize(device)
                marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(
        output_dir=os.path.join(spec["work"], "peer_hf_trainer"), per_device_train_batch_size=spec["batch"],
        max_steps=spec["warmup"] + spec["steps"], bf16=True, optim="adamw_torch_fused",
        learning_rate=OPTIMIZER["lr"], adam_beta1=OPTIMIZER["betas"][0], adam_beta2=OPTIMIZER["betas"][1],
        weight_decay=OPTIMIZER["weight_decay"], max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="constant",
        logging_steps=10**6, save_strategy="no", report_to=[], dataloader_pin_memory=device.type == "cuda",
        use_cpu=device.type == "cpu")
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()])
    loss = trainer.train().training_loss
    if spec["warmup"] not in marks:  # warm-up 0: the window starts before the first step
        raise RuntimeError("the peer's clock did not start; spec['warmup'] must be >= 1")
    seconds = marks[spec["warmup"] + spec["steps"]] - marks[spec["warmup"]]
    return _figures(spec, model, device, seconds, loss)


# --- shared by the peers ------------------------------------------------------------------------------

def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _model(spec: dict, device: torch.device):
    """A random-init Llama of the item's shape, sdpa attention, fp32 weights on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec["shape_config"], attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:
        return LlamaForCausalLM(config)


def _batches(spec: dict, vocab: int) -> list:
    generator = torch.Generator().manual_seed(0)
    shape = (spec["batch"], spec["seq_len"])
    pin = torch.cuda.is_available()
    return [torch.randint(vocab, shape, generator=generator).pin_memory() if pin
            else torch.randint(vocab, shape, generator=generator) for _ in range(spec["warmup"] + spec["steps"])]


def _timed(spec: dict, device: torch.device, step) -> tuple[float, torch.Tensor]:
    """Run every batch through `step`; the seconds of the steps after the warm-up."""
    for index, batch in enumerate(_batches(spec, spec["shape_config"]["vocab_size"])):
        if index == spec["warmup"]:
            _synchronize(device)
            start = time.perf_counter()
        loss = step(batch.to(device, non_blocking=True))
    _synchronize(device)
    return time.perf_counter() - start, loss


def _figures(spec: dict, model, device: torch.device, seconds: float, last_loss: float) -> dict:
    from launcher.training.metrics import flops_per_token, peak_flops_per_device, peak_memory_gib

    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    tokens_per_s = spec["steps"] * spec["batch"] * spec["seq_len"] / seconds
    per_token = flops_per_token(model.config, params, params, embedding, spec["seq_len"])
    peak = peak_flops_per_device(device, spec.get("peak_flops"))
    figures = {"params": params, "batch": spec["batch"], "seq_len": spec["seq_len"], "timed_steps": spec["steps"],
               "tokens_per_s": tokens_per_s, "step_s": seconds / spec["steps"], "flops_per_token": per_token,
               "mfu": tokens_per_s * per_token / peak if peak else None,
               "mfu_6n": 6 * params * tokens_per_s / peak if peak else None,
               "peak_memory_gib": peak_memory_gib(device), "last_loss": last_loss, "torch": torch.__version__}
    return {"figures": figures, "passed": math.isfinite(last_loss), "criterion": "finite loss"}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
