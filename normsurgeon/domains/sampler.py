"""Domain-pure batches: each batch holds samples of one domain (the DSBN training default).

    loader = DataLoader(dataset, batch_sampler=DomainBatchSampler(domain_labels, 32, seed=0))

Within each domain the samples are shuffled and cut into batches; the batches of all domains
are then shuffled together, so the domains interleave over an epoch. A domain's last, smaller
batch is kept unless ``drop_last``; a batch of one sample is always dropped (it has no batch
statistics). A new order every epoch (the epoch counter advances on each ``iter``).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class DomainBatchSampler(Sampler[list[int]]):
    """Batches of indices, each from a single domain. ``domains``: (N,) domain index per sample."""

    def __init__(self, domains: torch.Tensor | Sequence[int], batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2 (BatchNorm needs two samples), got {batch_size!r}")
        self.domains = torch.as_tensor(domains, dtype=torch.long).flatten()
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.epoch = 0

    def _batches(self, gen: torch.Generator | None) -> list[list[int]]:
        batches = []
        for d in torch.unique(self.domains).tolist():
            idx = torch.nonzero(self.domains == d).flatten()
            if gen is not None:
                idx = idx[torch.randperm(idx.numel(), generator=gen)]
            for chunk in idx.split(self.batch_size):
                if chunk.numel() >= (self.batch_size if self.drop_last else 2):
                    batches.append(chunk.tolist())
        if gen is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch) if self.shuffle else None
        self.epoch += 1
        return iter(self._batches(gen))

    def __len__(self) -> int:
        return len(self._batches(None))
