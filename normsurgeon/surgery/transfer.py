"""Moving pretrained tensors from a source norm into a new one, with an account of each move.

Rules used by the standard targets (see the README table):
- affine γ, β are copied whenever both sides have them; a target affine with no source affine
  starts at γ = 1, β = 0 ("reset"); a source affine with no target affine is "dropped".
- running statistics are copied only between batch-statistics norms (BN, frozen BN); a BN
  target of a source without them starts at mean 0, var 1 ("reset"); a target without them
  "drops" the source's.
Values are copied (never aliased), so converting never ties the new model to the old one.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import Built
from .sources import SourceNorm


class Transfer:
    """Accumulates a ``Built`` while copying tensors from ``source`` into ``module``."""

    def __init__(self, source: SourceNorm, module: nn.Module):
        self.source = source
        self.built = Built(module)
        if source.note:
            self.built.notes.append(source.note)

    @torch.no_grad()
    def affine(self) -> "Transfer":
        src, dst, b = self.source, self.built.module, self.built
        for name in ("weight", "bias"):
            have, want = getattr(src, name), getattr(dst, name, None)
            if have is not None and want is not None:
                want.copy_(have.detach().to(want.dtype))
                b.transferred.append(name)
            elif want is not None:
                b.reset.append(name)
            elif have is not None:
                b.dropped.append(name)
        return self

    @torch.no_grad()
    def statistics(self) -> "Transfer":
        """Copy running mean/var (and the step counter) if the source has batch statistics."""
        src, dst, b = self.source, self.built.module, self.built
        has_slot = getattr(dst, "running_mean", None) is not None
        if src.kind in ("batch", "frozen_batch") and src.has_statistics and has_slot:
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)
            b.transferred += ["running_mean", "running_var"]
            counter = getattr(dst, "num_batches_tracked", None)
            if src.num_batches_tracked is not None and counter is not None:
                counter.copy_(src.num_batches_tracked)
                b.transferred.append("num_batches_tracked")
            elif src.num_batches_tracked is not None:
                b.dropped.append("num_batches_tracked")
        elif has_slot:
            b.reset += ["running_mean", "running_var"]
            b.notes.append("the source has no batch statistics: running mean 0, var 1 until "
                           "the model is calibrated or trained")
        else:
            self.drop_statistics()
        return self

    def drop_statistics(self) -> "Transfer":
        src, b = self.source, self.built
        if src.has_statistics:
            b.dropped += ["running_mean", "running_var"]
            if src.num_batches_tracked is not None:
                b.dropped.append("num_batches_tracked")
        return self

    def note(self, text: str) -> "Transfer":
        self.built.notes.append(text)
        return self

    def exact(self, where: str) -> Built:
        self.built.exact = where
        return self.built
