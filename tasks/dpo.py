"""The `dpo` task: direct preference optimisation of a causal LM on (prompt, chosen, rejected)
pairs (sigmoid loss, Rafailov et al. 2023; conservative with dpo.label_smoothing), then a
HuggingFace model in `<output_dir>/final-model`.

What a training run does is the run skeleton's (launcher/training/trainer.py). DPO adds its data
(launcher/data/pairs.py), the loss of a batch of pairs, and the frozen reference the loss compares
the policy with, which is the model before training:
- peft=lora: the same model with its adapters switched off (the frozen base, no second copy);
- otherwise: every pair's log-probs under the initial model, computed once before the first
  step and kept in checkpoints (2 floats per pair instead of a second model in memory and a
  second forward pass per step).
"""

import base64
import itertools
import logging
import time

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from launcher.data.loaders import PairCollator, eval_loader, train_loader
from launcher.data.pairs import check_pair_format, max_prompt_len, preference_splits
from launcher.data.sources import SOURCES
from launcher.errors import ConfigError, at_least
from launcher.model.lora import lora_enabled
from launcher.model.losses import dpo_loss, sequence_log_probs
from launcher.training.trainer import Trainer, TrainingTask

log = logging.getLogger("hydralm")


def dpo(cfg: DictConfig) -> dict:
    return Trainer(cfg, DPO(cfg)).run()


class DPO(TrainingTask):
    """The loss is the mean per pair; rewards are beta * log(policy / reference) per response."""

    name = "dpo"
    metrics = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.ignore_index = cfg.data.ignore_index
        self.reference = AdaptersOff(self) if lora_enabled(cfg.peft) else InitialLogProbs(self)

    def datasets(self, tokenizer, world):
        return preference_splits(self.cfg, tokenizer, world)

    def collator(self, tokenizer):
        return PairCollator(tokenizer.pad_token_id, self.ignore_index)

    def weight(self, batch: dict) -> torch.Tensor:
        return self.real_pairs(batch).sum()

    def loss(self, model, batch: dict):
        """Sums over the batch's real pairs, in fp64 from the sequence log-probs on: where policy
        and reference agree, every reward is exactly 0 and the loss exactly ln 2."""
        policy = self.log_probs(model, batch).double()
        reference = self.reference.log_probs(model, batch).double()
        losses, chosen, rejected = dpo_loss(*policy.chunk(2), *reference.chunk(2), self.cfg.dpo.beta,
                                            self.cfg.dpo.label_smoothing)
        real = self.real_pairs(batch).double()
        metrics = {"rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected,
                   "reward_accuracy": (chosen > rejected).double()}  # a tie counts as wrong
        return (losses * real).sum(), {name: (value * real).sum() for name, value in metrics.items()}

    def log_probs(self, model, batch: dict) -> torch.Tensor:
        """Sequence log-probs of the 2 x B rows: the chosen sides, then the rejected ones."""
        return sequence_log_probs(model, batch, self.ignore_index)

    def real_pairs(self, batch: dict) -> torch.Tensor:
        """False for eval padding rows (launcher.data.loaders.EvenShard): they have no target."""
        chosen_labels = batch["labels"][: len(batch["pair_id"]), 1:]
        return (chosen_labels != self.ignore_index).any(dim=1)

    def setup(self, model, trainer: Trainer) -> None:
        if self.cfg.dpo.disable_dropout:
            switched_off = disable_dropout(model)
            if trainer.world.is_main and switched_off:
                log.info("dpo: dropout off in %d places (dpo.disable_dropout=false keeps it)", switched_off)
        self.reference.setup(model, trainer)

    def state_dict(self) -> dict:
        return self.reference.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reference.load_state_dict(state)


def disable_dropout(model: torch.nn.Module) -> int:
    """Dropout probabilities to 0 (TRL's `disable_dropout`): the reference's log-probs are computed
    in eval mode, so a policy forward with dropout would start DPO at rewards != 0 and a loss
    != ln 2. Covers dropout modules (LoRA's included) and the float rates that attention code and
    functional dropout read from modules or from the config at forward time (`attention_dropout`,
    OPT's `dropout`, GPT-2's `attn_pdrop`, ...). Returns how many were set."""
    switched_off = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            switched_off += module.p > 0
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                switched_off += value > 0
                setattr(module, name, 0.0)
    configs = [module.config for module in model.modules() if hasattr(module, "config")
               and hasattr(module.config, "to_dict")]
    for config in {id(c): c for c in configs}.values():
        for name, value in list(vars(config).items()):
            if _is_dropout_rate(name, value):
                setattr(config, name, 0.0)
    return switched_off


def _is_dropout_rate(name: str, value) -> bool:
    return (name.endswith("dropout") or name.endswith("pdrop")) and isinstance(value, float)


class AdaptersOff:
    """peft=lora: the reference is the model with its adapters switched off, in eval mode."""

    def __init__(self, task: DPO):
        self.task = task

    @torch.no_grad()
    def log_probs(self, model, batch: dict) -> torch.Tensor:
        training = model.training
        model.eval()
        with model.disable_adapter():
            log_probs = self.task.log_probs(model, batch)
        model.train(training)
        return log_probs

    def setup(self, model, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class InitialLogProbs:
    """Every pair's (chosen, rejected) log-probs under the initial model, by pair id.

    Computed in eval mode by the training model itself (same sharding, precision and kernels),
    on exactly the batches of the first epoch and of eval (then the pairs epoch 0 leaves out),
    so the policy is bit-equal to its reference where it has not moved yet. A checkpoint
    carries the table (base64 float32), so a resumed run uses the very same values.
    """

    def __init__(self, task: DPO):
        self.task = task
        self.table = None  # (pairs, 2) on the device

    def log_probs(self, model, batch: dict) -> torch.Tensor:
        return self.table[batch["pair_id"]].T.reshape(-1)

    def setup(self, model, trainer: Trainer) -> None:
        pairs = len(trainer.splits["train"]) + len(trainer.splits["eval"])
        if self.table is not None:  # restored from a checkpoint
            if len(self.table) != pairs:
                raise ConfigError(f"resume: the checkpoint's reference holds {len(self.table)} pairs, the data {pairs}")
            self.table = self.table.to(trainer.world.device)
            return
        start = time.perf_counter()
        self.table = self._compute(model, trainer, pairs)
        if trainer.world.is_main:
            log.info("dpo: reference log-probs of %d pairs in %.1f s", pairs, time.perf_counter() - start)

    @torch.no_grad()
    def _compute(self, model, trainer: Trainer, pairs: int) -> torch.Tensor:
        cfg, world, splits = trainer.cfg, trainer.world, trainer.splits
        collate = self.task.collator(trainer.tokenizer)
        model.eval()
        table, seen = self._score(model, [train_loader(splits["train"], cfg, world, collate),
                                          eval_loader(splits["eval"], cfg, world, collate)], pairs, world)
        left_out = torch.nonzero(seen[: len(splits["train"])] == 0).flatten().tolist()
        if left_out:  # the remainder of epoch 0's last global batch
            more, more_seen = self._score(model, [eval_loader(splits["train"].select(left_out), cfg, world, collate)],
                                          pairs, world)
            table, seen = table + more, seen + more_seen
        model.train()
        if not torch.all(seen == 1):
            raise RuntimeError(f"reference log-probs: {int((seen != 1).sum())} of {pairs} pairs not scored exactly once")
        return table

    def _score(self, model, loaders, pairs: int, world) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the loaders' pairs on this rank, summed over ranks (each pair is one rank's)."""
        table = torch.zeros(pairs, 2, device=world.device)
        seen = torch.zeros(pairs, device=world.device)
        batches = sum(len(loader) for loader in loaders)
        for batch in tqdm(itertools.chain(*loaders), total=batches, desc="reference log-probs", unit="batch",
                          disable=not world.is_main, leave=False):
            batch = {name: tensor.to(world.device) for name, tensor in batch.items()}
            real = self.task.real_pairs(batch)
            ids = batch["pair_id"][real]
            table[ids] = self.task.log_probs(model, batch).view(2, -1).T[real]
            seen[ids] += 1
        if world.size > 1:
            dist.all_reduce(table)
            dist.all_reduce(seen)
        return table, seen

    def state_dict(self) -> dict:
        values = self.table.cpu().numpy().astype("<f4")
        return {"reference_log_probs": base64.b64encode(values.tobytes()).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        if "reference_log_probs" not in state:
            raise ConfigError("resume: the checkpoint holds no DPO reference log-probs (was it written by task=dpo "
                              "with peft=none?); use resume=never or another output_dir to start over")
        values = np.frombuffer(base64.b64decode(state["reference_log_probs"]), dtype="<f4")
        self.table = torch.from_numpy(values.astype(np.float32)).view(-1, 2)


def check_dpo(cfg: DictConfig) -> None:
    """task=dpo's own keys and what it needs of the others, before any work."""
    dpo = cfg.dpo
    if dpo is None:
        raise ConfigError("task=dpo needs the dpo keys that conf/task/dpo.yaml sets (use task=dpo)")
    if dpo.beta <= 0:
        raise ConfigError(f"dpo.beta={dpo.beta} must be > 0")
    if not 0 <= dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={dpo.label_smoothing} must be in [0, 0.5)")
    at_least(dpo.max_prompt_len, 1, "dpo.max_prompt_len")
    if max_prompt_len(cfg) > cfg.train.max_seq_len - 2:
        raise ConfigError(f"dpo.max_prompt_len={max_prompt_len(cfg)} must leave room for a response: at most "
                          f"train.max_seq_len - 2 = {cfg.train.max_seq_len - 2}")
    data = cfg.data
    check_pair_format(data)
    if SOURCES.get(data.source).tokenized:
        raise ConfigError(f"data.source={data.source} holds tokenized language-modelling rows; task=dpo reads "
                          "prompt/chosen/rejected pairs (data=pydoc_pairs, files, disk or hub)")
    for key in ("separator", "seperator", "document_mask"):
        if data[key]:
            raise ConfigError(f"data.{key} does not apply to task=dpo (a pair's prompt is its dpo.prompt_field "
                              "column; pairs are never packed)")
