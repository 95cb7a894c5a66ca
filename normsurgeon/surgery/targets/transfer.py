"""Moving pretrained tensors from a source norm into a new one, with an account of each move.

Rules used by the standard targets (see the README table):
- affine γ, β are copied whenever both sides have them; a target affine with no source affine
  starts at γ = 1, β = 0 ("reset"); a source affine with no target affine is "dropped".
- running statistics are copied only between batch-statistics norms (BN, frozen BN); a BN
  target of a source without them starts at mean 0, var 1 ("reset"); a target without them
  "drops" the source's.
- ``fold_statistics`` (default for gn/ln/in/pn from a BatchNorm): the dropped running
  statistics are folded into the new affine instead of being thrown away. If a sample's
  statistics over a group g of channels equal the population's (μ_g, σ²_g, computed from the
  channels' running mean/var: μ_g = mean_{c∈g} μ_c, σ²_g = mean_{c∈g}(σ²_c + μ_c²) − μ_g²),
  then BN(x)_c = γ'_c · (x − μ_g)/sqrt(σ²_g + eps') + β'_c with
      γ'_c = γ_c · sqrt(σ²_g + eps') / sqrt(σ²_c + eps),
      β'_c = β_c + γ_c · (μ_g − μ_c) / sqrt(σ²_c + eps).
  Exact for BGN-style group statistics (issue: Batch Group Norm); a data-free first-order
  start for per-sample norms, which calibration then refines.
Values are copied (never aliased), so converting never ties the new model to the old one.
"""
from __future__ import annotations

import torch
from torch import nn

from ..sources import SourceNorm
from .registry import Built


def group_statistics(mean: torch.Tensor, var: torch.Tensor, group_of_channel: torch.Tensor):
    """Population (mean, var) of each channel group from per-channel ones, as a mixture:
    μ_g = mean_{c∈g} μ_c, σ²_g = mean_{c∈g}(σ²_c + μ_c²) − μ_g². Float64, shape (G,)."""
    mu, var = mean.double(), var.double()
    groups = group_of_channel.to(mu.device)
    count = torch.zeros(int(groups.max()) + 1, dtype=mu.dtype, device=mu.device).index_add_(
        0, groups, torch.ones_like(mu))
    mean_g = torch.zeros_like(count).index_add_(0, groups, mu) / count
    power_g = torch.zeros_like(count).index_add_(0, groups, var + mu * mu) / count
    return mean_g, (power_g - mean_g * mean_g).clamp_min(0)


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
                           "the layer sees data")
        else:
            self.drop_statistics()
        return self

    @torch.no_grad()
    def fold_statistics(self, group_of_channel: torch.Tensor, eps: float) -> "Transfer":
        """Fold the source's running statistics into the target's affine (rule above).

        ``group_of_channel``: (C,) long tensor, the group index of each channel; ``eps``: the
        target's epsilon. No-op unless the source has batch statistics and both have an affine.
        """
        src, dst, b = self.source, self.built.module, self.built
        if not (src.kind in ("batch", "frozen_batch") and src.has_statistics and src.affine
                and getattr(dst, "weight", None) is not None):
            return self
        mu, var = src.running_mean.double(), src.running_var.double()
        groups = group_of_channel.to(mu.device)
        mean_g, var_g = group_statistics(mu, var, groups)
        std_c = torch.sqrt(var + src.eps)
        gamma, beta = src.weight.double(), src.bias.double()
        dst.weight.copy_(gamma * torch.sqrt(var_g[groups] + eps) / std_c)
        dst.bias.copy_(beta + gamma * (mean_g[groups] - mu) / std_c)
        b.notes.append("running statistics folded into weight and bias (fold_statistics=True)")
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
