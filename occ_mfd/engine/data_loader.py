"""The training DataLoader: seeded, ``drop_last``, sharded over ranks, and resumable mid-epoch.

The position in the data is a pure function of the global step: epoch ``step // B`` and batch
``step % B`` within it (``B`` = batches per epoch per rank). :class:`ResumableSampler` is torch's
``DistributedSampler`` (same per-epoch permutation from ``seed + epoch``, same rank slicing, also used
with one process) that can start part-way through an epoch, so a resumed run sees exactly the batches
the uninterrupted run would have seen, without loading the skipped ones.
"""
from __future__ import annotations

import itertools
import signal

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Iterate epoch ``epoch`` from its ``start``-th sample (of this rank's shard)."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the workers ignore SIGTERM / SIGINT.

    Why: a scheduler (SLURM) and a terminal's Ctrl-C signal the whole process group. The trainer turns the
    signal into "finish the step, checkpoint, stop" (:mod:`occ_mfd.engine.preempt`); a worker killed by it
    would instead make torch raise "DataLoader worker ... killed by signal" inside the trainer before it can
    save. Workers still end with the trainer: it shuts them down, and they watch their parent if it dies.
    """
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


class StepLoader:
    """``batch(step)`` → the batch of global step ``step`` (steps must be requested in order, as the loop
    does; a jump, e.g. on resume, restarts the iterator at the right position)."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0, collate_fn=None, pin_memory: bool = False):
        self.sampler = ResumableSampler(dataset, world_size, rank, seed)
        self.batch_size = batch_size
        self.batches_per_epoch = self.sampler.num_samples // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"dataset of {len(dataset)} samples gives no full batch of {batch_size} per rank "
                             f"on {world_size} rank(s): lower train.batch_size or add data")
        self.seed, self.rank = seed, rank
        # A private generator for worker seeds: the global torch RNG (used by the objective) is not consumed
        # when an epoch's iterator starts, so resumption does not shift it.
        self.generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=collate_fn, drop_last=True, pin_memory=pin_memory,
                                 generator=self.generator,
                                 worker_init_fn=ignore_stop_signals if num_workers > 0 else None)
        self._it = None
        self._next_step = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of global step ``step``."""
        return divmod(step, self.batches_per_epoch)

    def batch(self, step: int):
        epoch, b = self.position(step)
        if self._it is None or step != self._next_step or b == 0:
            self.sampler.set_position(epoch, b * self.batch_size)
            self.generator.manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + epoch)
            self._it = iter(self.loader)
        self._next_step = step + 1
        return next(self._it)
