"""An m-per-class sampler: batches made of classes with ``m`` images each, so the metric loss sees positives.

With 5,270 classes a shuffled batch of 256 images holds almost no two images of one class; here every
consecutive run of ``m`` indices shares a class. Under DDP each rank takes its own share of the groups
(so Lightning must not wrap it: the training loop sets ``use_distributed_sampler=False``).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from ..errors import UserError


class MPerClassSampler(Sampler[int]):
    """Indices in groups of ``m`` with one label each; classes with fewer than ``m`` samples are drawn with
    replacement. ``labels [N]`` (< 0 = unusable, never drawn). Reshuffled by :meth:`set_epoch`."""

    def __init__(self, labels: np.ndarray, m: int, seed: int = 0, rank: int | None = None,
                 world: int | None = None) -> None:
        if m < 1:
            raise UserError(f"m per class must be at least 1, got {m}")
        self.labels, self.m, self.seed, self.epoch = np.asarray(labels), m, seed, 0
        self._rank, self._world = rank, world
        valid = np.flatnonzero(self.labels >= 0)
        order = valid[np.argsort(self.labels[valid], kind="stable")]
        bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
        self.members = [g for g in np.split(order, bounds) if len(g)]
        self.n_groups = sum(max(1, len(g) // m) for g in self.members)

    def _ddp(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank, self._world or 1
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n_groups // self._ddp()[1]) * self.m

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        groups = []
        for g in self.members:
            if len(g) < self.m:
                groups.append(rng.choice(g, self.m, replace=True))
                continue
            g = rng.permutation(g)
            groups += [g[i:i + self.m] for i in range(0, len(g) - self.m + 1, self.m)]
        order = rng.permutation(len(groups))
        rank, world = self._ddp()
        mine = order[rank::world][: len(order) // world]
        self.epoch += 1  # a fresh order next epoch even if nobody calls set_epoch
        return iter(np.concatenate([groups[i] for i in mine]).tolist() if len(mine) else [])
