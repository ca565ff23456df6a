"""FSDP2 wrapping: one DeviceMesh per strategy, one FSDP unit per decoder layer."""

import torch
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from launcher.distributed import World
from launcher.errors import ConfigError
from launcher.modeling import decoder_layers

MESH_DIMS = ("replicate", "shard")


def build_mesh(sharding: DictConfig, world: World) -> DeviceMesh:
    """NO_SHARD: (world, 1). FULL_SHARD/SHARD_GRAD_OP: (1, world). HYBRID_SHARD: (nodes, node size)."""
    strategy = sharding.strategy
    if strategy == "NO_SHARD":
        shape = (world.size, 1)
    elif strategy == "HYBRID_SHARD":
        group = sharding.shard_group_size or world.local_size
        if world.size % group:
            raise ConfigError(
                f"sharding.strategy=HYBRID_SHARD needs the world size ({world.size}) to be divisible by "
                f"sharding.shard_group_size ({group}, ranks per node unless set)"
            )
        shape = (world.size // group, group)
    else:
        shape = (1, world.size)
    return init_device_mesh(world.device.type, shape, mesh_dim_names=MESH_DIMS)


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, sharding: DictConfig, use_mp: bool) -> torch.nn.Module:
    """Apply fully_shard bottom-up: each decoder layer, the input embeddings and the output head
    (when not tied), then the root (the rest: final norm, positions, tied embeddings).

    Embeddings and head as their own units are gathered only around their own forward and
    backward, instead of for the whole step with the root (for a 0.5B Llama with a 32k vocabulary,
    two 125 MiB matrices and their gradients)."""
    if sharding.strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        mesh = mesh["shard"]  # plain FSDP: no replicate dimension to all-reduce over
    options = dict(
        mesh=mesh,
        reshard_after_forward=sharding.strategy in ("FULL_SHARD", "HYBRID_SHARD"),
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if use_mp
        else MixedPrecisionPolicy(),
        offload_policy=CPUOffloadPolicy() if sharding.cpu_offload else OffloadPolicy(),
    )
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        fully_shard(embeddings, **options)
        # the head's backward follows its forward at once: resharding in between only re-gathers it
        fully_shard(head, **{**options, "reshard_after_forward": False})
    fully_shard(model, **options)
    return model


def needs_fsdp(cfg: DictConfig, world: World) -> bool:
    """A single fp32 NO_SHARD process has nothing to shard, reduce or cast: FSDP2 there only adds
    per-layer copy-in/copy-out and DTensor dispatch in the optimizer (~15% of a CPU step)."""
    single = world.size == 1 and cfg.sharding.strategy == "NO_SHARD"
    return not single or cfg.train.use_mp or cfg.sharding.cpu_offload


def prepare_model(model: torch.nn.Module, cfg: DictConfig, world: World, weights_follow: bool = False) -> torch.nn.Module:
    """Activation checkpointing, compile, FSDP2 (where it has work to do) and device placement,
    in the order they compose. Meta parameters (build_model's `low_cpu_mem_usage` on ranks > 0,
    or `empty` with `weights_follow`: the caller loads the weights next) are allocated here."""
    # low_cpu_mem_usage: rank 0 keeps references to its full weights to scatter them after sharding.
    scatter = cfg.sharding.low_cpu_mem_usage and world.size > 1 and not weights_follow
    full_state = model.state_dict() if scatter and world.is_main else None
    if cfg.train.use_activation_checkpointing:
        enable_activation_checkpointing(model, cfg.train.activation_checkpointing_every)
    if cfg.train.compile:
        for layer in decoder_layers(model):
            layer.compile()
    if needs_fsdp(cfg, world):
        model = shard_model(model, build_mesh(cfg.sharding, world), cfg.sharding, cfg.train.use_mp)
    home = torch.device("cpu") if cfg.sharding.cpu_offload else world.device
    if any(p.is_meta for p in model.parameters()):
        _allocate(model, home)
    else:
        model.to(home)
    if scatter:
        load_from_rank0(model, full_state or {})
    model.train()
    return model


def _allocate(model: torch.nn.Module, device: torch.device) -> None:
    """Give meta parameters (empty) storage on `device`; the buffers keep the values computed when
    the model was built (to_empty alone would leave them empty too)."""
    buffers = {name: buffer.to(device, copy=True) for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])


def enable_activation_checkpointing(model: torch.nn.Module, every: int) -> None:
    """Non-reentrant recomputation of every `every`-th decoder layer (1: all of them)."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for index, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = index % every == 0


def load_from_rank0(model: torch.nn.Module, full_state: dict) -> None:
    """Scatter rank 0's full weights into every rank's shards (other ranks pass {})."""
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds between steps (its shards under FSDP)."""
    return sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters())


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction on all but the last micro-batch (no-op without FSDP)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
