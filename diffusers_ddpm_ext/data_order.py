"""Data order: a resumable, seeded, process-sharded batch sampler and the DataLoader built on it.

The order of an epoch depends only on ``(seed, epoch)``, the random augmentation of a sample only on
``(seed, epoch, position)`` (the sampler hands each index together with its own augmentation seed to the
dataset), so the stream is the same for any ``num_workers`` and can be resumed at an exact ``(epoch, batch)``
position. Sharding across processes is done by the sampler itself (``num_replicas``/``rank``).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------
# Resumable, seeded data order
# ----------------------------------------------------------------------------------------------------


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes (seed, epoch) so neighbouring seeds/epochs give unrelated streams.
    state = int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(state)


def _resolve_key(key) -> tuple[int, torch.Generator]:
    # The sampler passes (index, augmentation_seed); plain integer indexing seeds by the index itself.
    if isinstance(key, (tuple, list)):
        index, sample_seed = int(key[0]), int(key[1])
    else:
        index = int(key)
        sample_seed = index
    return index, torch.Generator().manual_seed(sample_seed)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, augmentation_seed)`` whose order depends only on ``(seed, epoch)``.

    Each epoch draws a permutation (and one augmentation seed per position) from a generator seeded with
    ``(seed, epoch)``. The epoch is cut into *global* batches of ``batch_size * num_replicas`` positions and
    rank ``r`` takes the ``r``-th contiguous slice of each, so global batch ``b`` is the same samples for any
    number of workers, and ``skip`` of ``k`` batches reproduces the tail of an uninterrupted epoch exactly.

    With ``drop_last=False`` the last global batch is padded by wrapping around the permutation to a multiple
    of ``num_replicas`` and split evenly, so every rank runs the same number of steps.

    Args:
        num_samples: dataset length.
        batch_size: per-process batch size.
        seed: data seed.
        shuffle: permute each epoch (otherwise ``0..N-1``; augmentation seeds still depend on the epoch).
        drop_last: drop the last incomplete global batch.
        num_replicas: number of processes (``accelerator.num_processes``).
        rank: this process (``accelerator.process_index``).
    """

    def __init__(self, num_samples, batch_size, seed=0, shuffle=True, drop_last=False, num_replicas=1, rank=0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self._skip = 0
        if self.batches_per_epoch == 0:
            raise ValueError(f"drop_last with {num_samples} samples leaves no batch of {batch_size} x "
                             f"{num_replicas} processes")

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch on each process (independent of any pending skip)."""
        global_batch = self.batch_size * self.num_replicas
        if self.drop_last:
            return self.num_samples // global_batch
        return math.ceil(self.num_samples / global_batch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (Accelerate's ``DataLoaderShard`` also calls this); keeps a pending skip."""
        self.epoch = int(epoch)

    def skip(self, num_batches: int) -> None:
        """Start the next iteration at batch ``num_batches`` of the current epoch (one-shot)."""
        if not 0 <= num_batches <= self.batches_per_epoch:
            raise ValueError(f"num_batches must be in [0, {self.batches_per_epoch}], got {num_batches}")
        self._skip = int(num_batches)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data seed mismatch: checkpoint has {state['seed']}, sampler has {self.seed}")
        self.epoch = int(state["epoch"])

    def __len__(self) -> int:
        return self.batches_per_epoch - self._skip

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """All batches of ``epoch`` for this rank (no skip)."""
        g = _epoch_generator(self.seed, epoch)
        n = self.num_samples
        perm = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2**62, (n,), generator=g)
        global_batch = self.batch_size * self.num_replicas
        batches = []
        for b in range(self.batches_per_epoch):
            start = b * global_batch
            stop = min(start + global_batch, n)
            width = stop - start
            if width < global_batch:  # last, partial global batch: pad to a multiple of num_replicas
                width = math.ceil(width / self.num_replicas) * self.num_replicas
            per_rank = width // self.num_replicas
            pos = [(start + self.rank * per_rank + j) % n for j in range(per_rank)]
            batches.append([(int(perm[p]), int(seeds[p])) for p in pos])
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skip, self._skip = self._skip, 0
        yield from self.epoch_batches(self.epoch)[skip:]


def resume_position(batches_done: int, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batch_in_epoch)`` after ``batches_done`` per-process batches (count micro-batches, i.e.
    ``global_step * gradient_accumulation_steps`` when resuming at an optimizer step)."""
    return divmod(int(batches_done), int(batches_per_epoch))


def make_dataloader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader driven by a :class:`ResumableBatchSampler` (reach it as ``loader.batch_sampler``).

    How the training script uses it with Accelerate (the sampler shards; the loader is **not** passed to
    ``accelerator.prepare``, batches are moved with ``.to(accelerator.device)``)::

        loader = make_dataloader(ds, args.train_batch_size, seed=args.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
        sampler = loader.batch_sampler
        first_epoch, skip = resume_position(resumed_micro_batches, sampler.batches_per_epoch)
        for epoch in range(first_epoch, num_epochs):
            sampler.set_epoch(epoch)
            if epoch == first_epoch:
                sampler.skip(skip)          # exact data position after --resume_from_checkpoint
            for batch in loader: ...

    Passing the loader through ``accelerator.prepare`` also works on one process (the sampler is kept; call
    ``loader.set_epoch(epoch)`` each epoch since Accelerate sets the sampler's epoch from its own counter),
    but with several processes Accelerate would shard whole batches again: use ``num_replicas``/``rank``.

    Args:
        dataset: a map-style dataset of this module (accepts ``(index, seed)`` keys).
        batch_size: per-process batch size.
        seed: data seed (order and augmentations).
        shuffle: shuffle each epoch.
        drop_last: drop the last incomplete global batch.
        num_workers: DataLoader workers; the stream does not depend on it.
        num_replicas: number of processes.
        rank: this process.
        pin_memory: DataLoader ``pin_memory``.
        persistent_workers: DataLoader ``persistent_workers`` (needs ``num_workers > 0``).
    """
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, shuffle, drop_last, num_replicas, rank)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )
