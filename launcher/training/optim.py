"""Optimizer from `optimizer._target_` + kwargs; learning-rate schedules by name.

Every schedule has the same small interface for the training loop: `step()` once per optimizer
step, `observe_eval(loss)` after each evaluation, `get_last_lr()`, and state_dict round trips.

Warmup never wastes a step: over W warmup steps the lr is peak x 1/(W+1), 2/(W+1), ..., and the
schedule proper starts at step W+1 (transformers' warmup starts at lr 0, so a 1-step run trained
nothing). W = ceil(warmup_ratio x steps), at most steps - 1, so every run reaches the peak.
"""

import inspect
import math
import warnings

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau, _update_param_group_val

from launcher.errors import ConfigError, check_arguments, choice_error, finite
from launcher.model.precision import optimizer_override
from launcher.registry import imported_class

PLATEAU_WITH_WARMUP = "plateau_with_warmup"
# VectorLM's spellings.
SCHEDULER_ALIASES = {"plataeu-with-warmup": PLATEAU_WITH_WARMUP, "plateau-with-warmup": PLATEAU_WITH_WARMUP}
EVAL_DRIVEN = ("reduce_lr_on_plateau", "greedy")  # transformers' schedulers stepped with a metric


# transformers' Trainer.get_decay_parameter_names (5.x): parameters of these layer types, or whose
# lowercase name matches one of these patterns, are not decayed (biases and norm weights).
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def build_optimizer(params, optimizer_cfg: DictConfig, precision: str = "fp32") -> torch.optim.Optimizer:
    """`optimizer` as configured; train.precision=bf16_sr: torchao's AdamW with the same arguments and
    bf16 stochastic rounding (launcher/model/precision.py)."""
    override = optimizer_override(optimizer_cfg, precision)
    if override is None:
        return instantiate(optimizer_cfg, params=params, _convert_="all")
    options = {k: v for k, v in OmegaConf.to_container(optimizer_cfg, resolve=True).items() if k != "_target_"}
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    optimizer_class = override.pop("class")
    return optimizer_class(params, **options, **override)


def parameter_groups(model: torch.nn.Module, optimizer_cfg: DictConfig, decay_norms_and_biases: bool) -> list:
    """The trainable parameters grouped as transformers' Trainer (and TRL) group them: weight
    decay on the rest, none on biases and norm weights. `decay_norms_and_biases` (or an
    optimizer without a `weight_decay` argument) keeps one group that decays every parameter."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer_class = imported_class("optimizer._target_", optimizer_cfg._target_)
    if decay_norms_and_biases or "weight_decay" not in inspect.signature(optimizer_class).parameters:
        return [{"params": [p for _, p in trainable]}]
    decayed = set(get_parameter_names(model, ALL_LAYERNORM_LAYERS, NO_DECAY_NAME_PATTERNS))
    groups = [{"params": [p for name, p in trainable if name in decayed]},
              {"params": [p for name, p in trainable if name not in decayed], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]  # LoRA adapters: all decayed


class StepSchedule:
    """A transformers LambdaLR schedule: advances per optimizer step, ignores eval losses.

    Built for one more warmup step and one more step in all and started one step in: step s
    then gets transformers' lr of step s+1 of that schedule, which is (s+1)/(W+1) in the warmup
    and, after it, exactly the unshifted schedule's lr of step s (every transformers schedule
    depends on the step only through `step - warmup` and `total - warmup`)."""

    def __init__(self, scheduler: LambdaLR):
        self.scheduler = scheduler
        with warnings.catch_warnings():  # torch warns that this skips the schedule's first value: the point
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()

    def step(self) -> None:
        self.scheduler.step()

    def observe_eval(self, loss: float) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [float(lr) for lr in self.scheduler.get_last_lr()]  # torchao's AdamW keeps lr as a tensor

    def state_dict(self) -> dict:
        return _json_ready(self.scheduler.state_dict())

    def load_state_dict(self, state: dict) -> None:
        """The saved step, under this schedule: a run continued with a new length (train.max_steps)
        takes its lr from the new schedule from the saved step on, including the next step's (the
        optimizer state holds the old schedule's). The same schedule gives the same values."""
        self.scheduler.load_state_dict(_lrs_as_optimizer_keeps_them(state, self.scheduler.optimizer))
        scheduler = self.scheduler
        lrs = [base * schedule(scheduler.last_epoch) for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            _update_param_group_val(group, "lr", lr)  # as LambdaLR sets it (a tensor lr stays a tensor)
        scheduler._last_lr = lrs


class WarmupThenEvalDriven:
    """Linear warmup per optimizer step, then a scheduler stepped with the eval loss."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, after_warmup):
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.warmup = LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
        self.after_warmup = after_warmup

    def step(self) -> None:
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self.warmup.step()

    def observe_eval(self, loss: float) -> None:
        if self.steps >= self.warmup_steps:
            self.after_warmup.step(loss)

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return _json_ready({"steps": self.steps, "warmup": self.warmup.state_dict(),
                            "after_warmup": self.after_warmup.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.warmup.load_state_dict(_lrs_as_optimizer_keeps_them(state["warmup"], self.optimizer))
        self.after_warmup.load_state_dict(_lrs_as_optimizer_keeps_them(state["after_warmup"], self.optimizer))


LR_LISTS = ("base_lrs", "_last_lr", "min_lrs")


def _json_ready(state):
    """A schedule's state for trainer_state.json: learning rates kept as 0-d tensors (torchao's
    AdamW, train.precision=bf16_sr) become floats (exact: a float32 value is a Python float)."""
    if isinstance(state, dict):
        return {key: _json_ready(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [_json_ready(value) for value in state]
    return state.item() if isinstance(state, torch.Tensor) else state


def _lrs_as_optimizer_keeps_them(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of _json_ready: an optimizer whose lr is a tensor gets its schedule's learning
    rates back as tensors of that dtype, so a resumed run computes them exactly as before."""
    lr = optimizer.param_groups[0]["lr"]
    if not isinstance(lr, torch.Tensor):
        return state
    return {key: [torch.tensor(v, dtype=lr.dtype) for v in value] if key in LR_LISTS and isinstance(value, list)
            else value for key, value in state.items()}


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    return min(math.ceil(warmup_ratio * total_steps), max(total_steps - 1, 0))


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler_cfg: DictConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = warmup_steps(scheduler_cfg.warmup_ratio, total_steps)
    kwargs = OmegaConf.to_container(scheduler_cfg.kwargs, resolve=True)
    name = scheduler_cfg.name
    try:
        if name == PLATEAU_WITH_WARMUP:
            return WarmupThenEvalDriven(optimizer, warmup, ReduceLROnPlateau(optimizer, **kwargs))
        if name in EVAL_DRIVEN:
            return WarmupThenEvalDriven(optimizer, warmup, get_scheduler(name, optimizer,
                                                                         scheduler_specific_kwargs=kwargs or None))
        if name == "inverse_sqrt":  # its default timescale is the warmup length: keep the user's W
            kwargs = {"timescale": warmup or 10_000, **kwargs}
        scheduler = get_scheduler(
            name,
            optimizer,
            num_warmup_steps=warmup + 1,  # shifted by one step: see StepSchedule
            num_training_steps=total_steps + 1,
            scheduler_specific_kwargs=kwargs or None,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler={name} cannot be built from scheduler.kwargs={kwargs}: {err}") from None
    return StepSchedule(scheduler)


def scheduler_names() -> list[str]:
    from transformers import SchedulerType

    return [s.value for s in SchedulerType] + [PLATEAU_WITH_WARMUP]


def scheduler_target(name: str) -> tuple:
    """The callable `scheduler.kwargs` go to for schedule `name`, its name for messages, and the
    arguments hydralm passes itself (a kwarg that one ignores is refused, not dropped)."""
    from transformers import SchedulerType
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, GreedyLR

    if name in (PLATEAU_WITH_WARMUP, SchedulerType.REDUCE_ON_PLATEAU.value):
        return ReduceLROnPlateau, "torch.optim.lr_scheduler.ReduceLROnPlateau", ("optimizer",)
    if name == SchedulerType.GREEDY.value:
        return GreedyLR, "transformers.optimization.GreedyLR", ("optimizer",)
    function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    passed = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")
    if name in (SchedulerType.CONSTANT.value, SchedulerType.CONSTANT_WITH_WARMUP.value):
        passed = tuple(inspect.signature(function).parameters)  # get_scheduler passes them no kwargs
    return function, function.__name__, passed


def normalise_scheduler(scheduler_cfg: DictConfig) -> None:
    """VectorLM's spelling of the plateau schedule becomes its hydralm name."""
    scheduler_cfg.name = SCHEDULER_ALIASES.get(scheduler_cfg.name, scheduler_cfg.name)


def check_scheduler(scheduler_cfg: DictConfig) -> None:
    """Accept VectorLM's spelling, check the name and ratio, bind `scheduler.kwargs` to the
    schedule's signature with types, then build the schedule on a throwaway parameter so bad
    values fail before any model loads."""
    if not 0 <= scheduler_cfg.warmup_ratio <= 1:
        raise ConfigError(f"scheduler.warmup_ratio={scheduler_cfg.warmup_ratio} must be in [0, 1]")
    names = scheduler_names()
    if scheduler_cfg.name not in names:
        raise choice_error("scheduler.name", scheduler_cfg.name, names)
    function, function_name, passed = scheduler_target(scheduler_cfg.name)
    kwargs = OmegaConf.to_container(scheduler_cfg.kwargs, resolve=True)
    try:
        check_arguments("scheduler.kwargs", kwargs, function, function_name, passed)
    except ConfigError as err:
        raise ConfigError(f"scheduler={scheduler_cfg.name} cannot be built: {err}") from None
    build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), scheduler_cfg, total_steps=100)


def check_optimizer(optimizer_cfg: DictConfig) -> None:
    """`_target_` imports, every other key is a parameter of it with a value of its type
    (spell-sensitive), every number is finite, and the optimizer accepts the values: it is built
    on a throwaway parameter, one key at a time, so the message names the key it refuses."""
    target = optimizer_cfg.get("_target_")
    if target is None:
        raise ConfigError("optimizer._target_ must name an optimizer class, e.g. torch.optim.AdamW")
    optimizer_class = imported_class("optimizer._target_", target)
    options = {k: v for k, v in OmegaConf.to_container(optimizer_cfg, resolve=True).items() if k != "_target_"}
    check_arguments("optimizer", options, optimizer_class, target, ("self", "params"), noun="parameter")
    for key, value in options.items():
        if not finite(value):
            raise ConfigError(f"optimizer.{key}={value} must be a finite number")
    error = _refusal(optimizer_class, options)
    if error is not None:
        # The key whose removal makes the optimizer accept the rest is the one to name.
        culprit = next((k for k in options if _refusal(optimizer_class, {o: v for o, v in options.items() if o != k})
                        is None), None)
        named = f"optimizer.{culprit}={options[culprit]}" if culprit else "optimizer"
        raise ConfigError(f"{named} is refused by {target}: {error}")


def _refusal(optimizer_class, options: dict):
    """The optimizer's own complaint about `options` (built on a throwaway parameter), or None."""
    try:
        optimizer_class([torch.nn.Parameter(torch.zeros(1))], **options)
    except (TypeError, ValueError, RuntimeError) as err:
        return err
    return None
