"""Batches for training and eval: collators and loaders.

Rows mark their trained tokens in columns named `*labels` (ignore_index elsewhere); that is how
eval padding rows (EvenShard) carry no loss for any task.
"""

import math
import signal

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from launcher.data.sampler import ResumableDistributedSampler
from launcher.distributed import World


class PadCollator:
    """Right-pads a list of rows into tensors; padded labels are ignored by the loss.

    With `document_mask`, the batch carries the rows' per-document `position_ids` (the model then
    keeps packed documents apart, see `launcher.model.losses.model_inputs`) and the first token of every
    document is not a target: predicting it would need the previous document. `input_tokens`
    counts the real (unpadded) tokens.
    """

    def __init__(self, pad_id: int, ignore_index: int, document_mask: bool = False):
        self.pad_id, self.ignore_index, self.document_mask = pad_id, ignore_index, document_mask

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), self.ignore_index, dtype=np.int64)
        position_ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n], labels[i, :n] = row["input_ids"], row["labels"]
            position_ids[i, :n] = row["position_ids"] if "position_ids" in row else np.arange(n)
        batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                 "input_tokens": torch.tensor(sum(len(row["input_ids"]) for row in rows))}
        if self.document_mask:
            labels[position_ids == 0] = self.ignore_index
            batch["position_ids"] = torch.from_numpy(position_ids)
        return batch


class PairCollator:
    """Preference pairs into one batch of 2 x B sequences, the chosen sides then the rejected
    ones, so one forward pass scores both; padded like PadCollator. `pair_id` holds each pair's
    `id` (unique over train and eval)."""

    def __init__(self, pad_id: int, ignore_index: int):
        self.pad = PadCollator(pad_id, ignore_index)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad([{"input_ids": row[f"{side}_input_ids"], "labels": row[f"{side}_labels"]}
                          for side in ("chosen", "rejected") for row in rows])
        batch["pair_id"] = torch.tensor([int(row["id"]) for row in rows])
        return batch


class EvenShard(torch.utils.data.Dataset):
    """This rank's strided share of an eval set, padded so every rank runs the same number of
    forward passes (FSDP collectives must match); padding rows carry only ignored labels (every
    `*labels` column)."""

    def __init__(self, dataset: Dataset, world: World, ignore_index: int):
        self.dataset, self.world, self.ignore_index = dataset, world, ignore_index
        self.length = math.ceil(len(dataset) / world.size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        index = self.world.rank + i * self.world.size
        if index < len(self.dataset):
            return self.dataset[index]
        row = dict(self.dataset[0])
        for name in row:
            if name.endswith("labels"):
                row[name] = np.full(len(row[name]), self.ignore_index)
        return row


def train_loader(dataset: Dataset, cfg: DictConfig, world: World, collate) -> DataLoader:
    """Batches of `data.train_bs` rows in DistributedSampler's order (the dataset's own order with
    data.shuffle=false), resumable at any position (the sampler holds it: launcher/data/sampler.py)."""
    sampler = ResumableDistributedSampler(len(dataset), world.size, world.rank, cfg.train.seed, cfg.data.shuffle)
    return DataLoader(
        dataset.with_format("numpy"),
        batch_size=cfg.data.train_bs,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        pin_memory=world.device.type == "cuda",  # lets the step's host-to-device copies run async
        generator=_own_generator(cfg),
        worker_init_fn=_leave_stop_signals_to_the_trainer,
    )


def eval_loader(dataset: Dataset, cfg: DictConfig, world: World, collate) -> DataLoader:
    return DataLoader(
        EvenShard(dataset.with_format("numpy"), world, cfg.data.ignore_index),
        batch_size=cfg.data.eval_bs,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        pin_memory=world.device.type == "cuda",
        generator=_own_generator(cfg),
        worker_init_fn=_leave_stop_signals_to_the_trainer,
    )


def _own_generator(cfg: DictConfig) -> torch.Generator:
    """Each new iterator draws a worker seed; from its own generator, that draw leaves the global
    RNG alone, so dropout after a resume sees the same random stream as the uninterrupted run."""
    return torch.Generator().manual_seed(cfg.train.seed)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C (and torchrun's forwarded signal) reach the whole process group; loader workers keep
    serving batches while the trainer checkpoints at the next step boundary (launcher/training/preemption.py).
    They exit with the trainer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
