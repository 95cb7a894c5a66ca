"""The order in which fine-tuning reads its data, reproducible from (seed, epoch, position).

Map-style data (a tensor, a tuple of tensors, a ``Dataset`` with ``len``): epoch e reads the
permutation ``randperm(n, generator=seed_e)`` in batches of ``batch_size`` (the last partial
batch is dropped, so every step sees the same batch size; data smaller than one batch is one
batch). Resuming at (epoch, position) needs no RNG state and loads no skipped item.

Any other iterable (a ``DataLoader``): each epoch iterates it again; to resume, the torch
RNG is set to its state at the start of that epoch (a shuffling DataLoader draws from it when
its iterator is created) and the batches already consumed are skipped. That is exact when the
loader is deterministic given the torch RNG (``num_workers=0`` or seeded workers).

Under several processes (``ranks``, see ``normsurgeon.distributed.ranks``), map-style data is read
as global batches of ``batch_size`` × world size from the same permutation on every rank, and each
rank takes its rows of it (DistributedSampler's interleaving): W ranks at ``batch_size`` B read
exactly what one process at B·W reads. A loader is taken as already sharded (DistributedSampler).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate


def as_dataset(data, what: str):
    """A map-style dataset for tensors / tuples of tensors / Datasets with len; else None."""
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        sizes = {t.shape[0] for t in data}
        if len(sizes) != 1:
            raise ValueError(f"{what}: the tensors have different lengths {sorted(sizes)}; pass (inputs, labels) "
                             f"with one row per sample")
        return TensorDataset(*data)
    if isinstance(data, Dataset) and hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return data
    if hasattr(data, "__iter__"):
        return None
    raise TypeError(f"{what} must be a tensor, a tuple (inputs, labels), a Dataset or an iterable of batches, "
                    f"got {type(data).__name__}")


class DataOrder:
    """Batches of epoch ``epoch`` from position ``start`` on; ``steps_per_epoch`` when known."""

    def __init__(self, data, batch_size: int, seed: int, what: str = "train_data", ranks=None):
        self.dataset, self.loader, self.batch_size, self.seed = as_dataset(data, what), data, batch_size, seed
        self.ranks = ranks
        if self.dataset is not None:
            n = len(self.dataset)
            if n == 0:
                raise ValueError(f"{what} is empty: fine-tuning needs at least one sample")
            self.steps_per_epoch = max(n // self._global_batch, 1)
        else:
            self.steps_per_epoch = len(data) if hasattr(data, "__len__") else None
            if self.steps_per_epoch == 0:
                raise ValueError(f"{what} is empty: the loader yields no batch")

    def batches(self, epoch: int, start: int = 0) -> Iterator:
        """For a loader, its iterator is created (drawing from the torch RNG) before this returns."""
        if self.dataset is not None:
            return self._dataset_batches(epoch, start)
        iterator = iter(self.loader)
        for _ in range(start):
            next(iterator, None)
        return iterator

    def _dataset_batches(self, epoch: int, start: int) -> Iterator:
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        size = min(self._global_batch, n)
        for b in range(start, self.steps_per_epoch):
            rows = order[b * size:(b + 1) * size]
            if self.ranks is not None:
                rows = self.ranks.shard(rows)
            yield default_collate([self.dataset[int(i)] for i in rows])

    @property
    def _global_batch(self) -> int:
        return self.batch_size * (self.ranks.world if self.ranks is not None else 1)
