"""Seeded, shardable, fast-forwardable data order for the training loop.

Each epoch is one seeded permutation of the dataset, cut into *global* batches of
``batch_size`` (the last incomplete one is dropped). Global batch s is split evenly over
the processes (rank r takes the r-th contiguous slice, like ``DistributedSampler`` with
the permutation shared), and each process's slice into ``grad_accum`` micro-batches. So
the samples of one optimizer step are the same whatever the number of processes, and a
resumed run starts at any step of an epoch without replaying the ones before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DataPlan:
    """How a dataset of ``num_samples`` is consumed (sizes are checked at construction)."""

    num_samples: int
    batch_size: int  # global, per optimizer step
    world_size: int
    grad_accum: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        per_step = self.world_size * self.grad_accum
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by processes x grad_accum "
                f"({self.world_size} x {self.grad_accum})"
            )
        if self.num_samples < self.batch_size:
            raise ValueError(f"dataset has {self.num_samples} samples, fewer than one batch ({self.batch_size})")

    @property
    def micro_batch_size(self) -> int:
        """Samples per forward pass on one process."""
        return self.batch_size // (self.world_size * self.grad_accum)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (incomplete last batch dropped)."""
        return self.num_samples // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def step_indices(self, order: np.ndarray, step_in_epoch: int, rank: int) -> list[list[int]]:
        """The ``grad_accum`` micro-batches of ``rank`` for one optimizer step of an epoch."""
        per_rank = self.batch_size // self.world_size
        start = step_in_epoch * self.batch_size + rank * per_rank
        mine = order[start : start + per_rank]
        mb = self.micro_batch_size
        return [mine[i * mb : (i + 1) * mb].tolist() for i in range(self.grad_accum)]


class EpochBatchSampler(Sampler[list[int]]):
    """``batch_sampler`` for a DataLoader: one rank's micro-batches of one epoch from a step on."""

    def __init__(self, plan: DataPlan, epoch: int, rank: int, start_step: int = 0):
        super().__init__()
        if not 0 <= start_step <= plan.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside the epoch (0..{plan.steps_per_epoch})")
        self.plan, self.epoch, self.rank, self.start_step = plan, epoch, rank, start_step

    def __iter__(self) -> Iterator[list[int]]:
        order = self.plan.epoch_order(self.epoch)
        for step in range(self.start_step, self.plan.steps_per_epoch):
            yield from self.plan.step_indices(order, step, self.rank)

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.start_step) * self.plan.grad_accum
