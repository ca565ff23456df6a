"""FSDP2 wrapping: one DeviceMesh per strategy, one FSDP unit per decoder layer.

A sharding strategy is a small class registered under its `sharding.strategy` name; a strategy
of your own is one class (subclass ShardingStrategy) and one YAML file in conf/sharding/ naming
it by its dotted path.
"""

import logging
import os

import torch
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

from launcher.distributed import CPU_AND_CUDA, World
from launcher.errors import ConfigError, at_least, choice_error
from launcher.model.modeling import decoder_layers
from launcher.model.precision import mixed_precision_policy
from launcher.registry import Registry

log = logging.getLogger("hydralm")

MESH_DIMS = ("replicate", "shard")

AUTO_STRATEGY = "AUTO"  # check_sharding upper-cases the name

STRATEGIES: Registry["ShardingStrategy"] = Registry("sharding.strategy", normalise=str.upper)


class ShardingStrategy:
    """How FSDP2 spreads the model over the ranks: a 2-D (replicate, shard) DeviceMesh and
    whether parameters are resharded after the forward. One class per `sharding.strategy`."""

    reshard_after_forward = True

    def __init__(self, sharding: DictConfig, world: World):
        self.sharding, self.world = sharding, world

    @classmethod
    def check(cls, sharding: DictConfig, world_size: int) -> None:
        """What this strategy needs of the launch, before the process group forms."""

    def mesh_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def layer_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """The mesh `fully_shard` gets (plain FSDP has no replicate dimension to all-reduce over)."""
        return mesh

    def needs_fsdp(self, cfg: DictConfig) -> bool:
        return True


@STRATEGIES.register("NO_SHARD")
class NoShard(ShardingStrategy):
    """Replicated parameters, all-reduced gradients (DDP semantics)."""

    def mesh_shape(self) -> tuple[int, int]:
        return (self.world.size, 1)

    def needs_fsdp(self, cfg: DictConfig) -> bool:
        """A single fp32 process has nothing to shard, reduce or cast: FSDP2 there only adds
        per-layer copy-in/copy-out and DTensor dispatch in the optimizer (~15% of a CPU step)."""
        return self.world.size > 1 or cfg.train.precision == "mixed" or cfg.sharding.cpu_offload


@STRATEGIES.register("FULL_SHARD")
class FullShard(ShardingStrategy):
    """Parameters, gradients and optimizer state sharded over all ranks (ZeRO-3-like)."""

    def mesh_shape(self) -> tuple[int, int]:
        return (1, self.world.size)

    def layer_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        return mesh["shard"]


@STRATEGIES.register("SHARD_GRAD_OP")
class ShardGradOp(FullShard):
    """Parameters stay gathered between forward and backward (ZeRO-2-like)."""

    reshard_after_forward = False


@STRATEGIES.register("HYBRID_SHARD")
class HybridShard(ShardingStrategy):
    """full_shard inside a shard group (default: a node), replication across groups."""

    @classmethod
    def check(cls, sharding: DictConfig, world_size: int) -> None:
        group = sharding.shard_group_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if world_size % group:
            raise ConfigError(
                f"sharding.strategy=HYBRID_SHARD needs the world size ({world_size}) to be divisible by "
                f"sharding.shard_group_size ({group}; default: ranks per node)"
            )

    def mesh_shape(self) -> tuple[int, int]:
        group = self.sharding.shard_group_size or self.world.local_size
        self.check(self.sharding, self.world.size)
        return (self.world.size // group, group)


def strategy_of(cfg: DictConfig, world: World) -> ShardingStrategy:
    return STRATEGIES.get(cfg.sharding.strategy)(cfg.sharding, world)


def check_sharding(cfg: DictConfig) -> None:
    """Before any work: the strategy exists (VectorLM's upper-case names are the canonical ones)."""
    sharding = cfg.sharding
    at_least(sharding.shard_group_size, 1, "sharding.shard_group_size")
    at_least(sharding.collective_timeout_s, 1, "sharding.collective_timeout_s")
    backends = ("auto", "gloo", "nccl", CPU_AND_CUDA)
    if sharding.backend not in backends:
        raise choice_error("sharding.backend", sharding.backend, backends)
    if sharding.strategy != AUTO_STRATEGY:  # auto: resolved where the job runs (launcher/model/device_defaults.py)
        STRATEGIES.get(sharding.strategy)  # an unknown name is a ConfigError listing the registered ones


def normalise_sharding(sharding: DictConfig) -> None:
    """VectorLM's upper-case names are the canonical ones (a dotted path is left as written)."""
    if "." not in str(sharding.strategy):
        sharding.strategy = str(sharding.strategy).upper()


def check_launch(cfg: DictConfig) -> None:
    """On the machine that runs the job: the strategy fits this launch (world size from
    torchrun/SLURM) and CUDA is there for what needs it."""
    from launcher.distributed import launch_world_size

    sharding = cfg.sharding
    world_size = launch_world_size()
    if sharding.strategy != AUTO_STRATEGY:
        STRATEGIES.get(sharding.strategy).check(sharding, world_size)
    cuda = torch.cuda.is_available()
    if sharding.backend == "nccl" and not cuda:
        raise ConfigError("sharding.backend=nccl needs CUDA devices; use sharding.backend=gloo (or auto) on CPU")
    if sharding.cpu_offload and not cuda:
        raise ConfigError("sharding.cpu_offload=true offloads GPU memory to the host; it needs CUDA devices")
    if sharding.cpu_offload and sharding.backend == "nccl" and world_size > 1:
        raise ConfigError("sharding.cpu_offload=true with several processes needs gloo for the host-resident "
                          "gradients next to nccl: use sharding.backend=auto (cpu:gloo,cuda:nccl)")
    if cfg.train.precision in ("mixed", "bf16", "bf16_sr") and not cuda:
        saves = "saves memory but " if cfg.train.precision != "mixed" else ""
        log.warning("train.precision=%s on CPU: bf16 %scomputes slower than fp32 here", cfg.train.precision, saves)


def shard_model(model: torch.nn.Module, strategy: ShardingStrategy, cfg: DictConfig) -> torch.nn.Module:
    """Apply fully_shard bottom-up: each decoder layer, the input embeddings and the output head
    (when not tied), then the root (the rest: final norm, positions, tied embeddings).

    Embeddings and head as their own units are gathered only around their own forward and
    backward, instead of for the whole step with the root (for a 0.5B Llama with a 32k vocabulary,
    two 125 MiB matrices and their gradients)."""
    mesh = init_device_mesh(strategy.world.device.type, strategy.mesh_shape(), mesh_dim_names=MESH_DIMS)
    options = dict(
        mesh=strategy.layer_mesh(mesh),
        reshard_after_forward=strategy.reshard_after_forward,
        mp_policy=mixed_precision_policy(cfg.train.precision),
        offload_policy=CPUOffloadPolicy() if cfg.sharding.cpu_offload else OffloadPolicy(),
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


def prepare_model(model: torch.nn.Module, cfg: DictConfig, world: World, weights_follow: bool = False) -> torch.nn.Module:
    """Activation checkpointing, compile, FSDP2 (where it has work to do) and device placement,
    in the order they compose. Meta parameters (build_model's `low_cpu_mem_usage` on ranks > 0,
    or `empty` with `weights_follow`: the caller loads the weights next) are allocated here."""
    from launcher.model.device_defaults import apply_device_defaults

    apply_device_defaults(cfg)  # a no-op after run_task's; a caller that composed its own config gets the rule too
    # low_cpu_mem_usage: rank 0 keeps references to its full weights to scatter them after sharding.
    scatter = cfg.sharding.low_cpu_mem_usage and world.size > 1 and not weights_follow
    full_state = model.state_dict() if scatter and world.is_main else None
    if cfg.train.use_activation_checkpointing:
        enable_activation_checkpointing(model, cfg.train.activation_checkpointing_every)
    if cfg.train.compile:
        for layer in decoder_layers(model):
            layer.compile()
    strategy = strategy_of(cfg, world)
    if strategy.needs_fsdp(cfg):
        model = shard_model(model, strategy, cfg)
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
