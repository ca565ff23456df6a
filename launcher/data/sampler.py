"""The training sampler: DistributedSampler's order, resumable at any position in O(1).

An epoch is one seeded permutation of the dataset (with data.shuffle=false: the dataset's own
order, every epoch), dealt round-robin to the ranks. After `k`
steps every rank has taken its share of a contiguous prefix of that permutation, so the data
position is one number: the global samples consumed in the epoch. Resuming slices the
permutation there (nothing is re-read), and a different world size deals the rest to its ranks.
"""

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    def __init__(self, dataset_size: int, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        self.dataset_size, self.num_replicas, self.rank, self.seed = dataset_size, num_replicas, rank, seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0  # global samples of this epoch already consumed

    def set_position(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.dataset_size:
            raise ValueError(f"sample offset {start} outside an epoch of {self.dataset_size} samples")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        # Like DistributedSampler(drop_last=True): the remainder that does not fill every rank is dropped.
        return (self.dataset_size - self.start) // self.num_replicas

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)  # DistributedSampler's seeding: the same order
            order = torch.randperm(self.dataset_size, generator=generator)[self.start:]
        else:
            order = torch.arange(self.dataset_size)[self.start:]
        order = order[: len(self) * self.num_replicas]
        return iter(order[self.rank :: self.num_replicas].tolist())
