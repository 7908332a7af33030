"""A distributed sampler that can resume mid-epoch at the exact sample where a checkpoint was taken."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Shuffled, rank-strided indices; ``state_dict`` records (epoch, samples consumed) on this rank.

    The permutation is a function of (seed, epoch) only, so every rank agrees on it and a resumed run
    replays the same order. Drops the tail so that every rank gets the same number of samples.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.consumed = 0  # samples of the current epoch already handed out on this rank
        self.per_rank = dataset_len // world_size

    def __len__(self) -> int:
        return self.per_rank - self.consumed

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g)
        else:
            order = torch.arange(self.dataset_len)
        mine = order[self.rank : self.per_rank * self.world_size : self.world_size].tolist()
        while self.consumed < self.per_rank:
            i = mine[self.consumed]
            self.consumed += 1
            yield i
        self.epoch += 1
        self.consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            # Samples were strided over another world size: restart the epoch rather than replay wrong data.
            self.epoch, self.consumed = state["epoch"], 0
            return
        self.epoch, self.consumed, self.seed = state["epoch"], state["consumed"], state["seed"]
