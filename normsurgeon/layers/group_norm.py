"""GroupNorm and its one-group case ``GroupNorm1`` (the "LN" of the GN papers), in either layout.

``GroupNorm``: channels split into G contiguous groups; per sample n and group g,
    y = γ_c (x − μ_{n,g}) / sqrt(σ²_{n,g} + eps) + β_c,
with μ, σ² (biased) over the C/G channels of the group and all positions. Batch-independent,
train = eval. ``GroupNorm1`` is GroupNorm with G = 1 (target ``ln``; timm names it the same): statistics over (C, *positions) per
sample with a per-channel affine (the "LN" of the GN and Proxy Norm papers). A transformer's
``nn.LayerNorm(C)`` on tokens normalizes each position over C: that is ``PositionalNorm``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusedActLayout, elements_per_channel


class GroupNorm(FusedActLayout, nn.GroupNorm):
    """``nn.GroupNorm`` with ``num_channels`` first, either layout, fused drop/act."""

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-5, affine: bool = True,
                 *, channels_last: bool = False, act: nn.Module | None = None,
                 drop: nn.Module | None = None):
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} does not divide num_channels={num_channels}")
        super().__init__(num_groups, num_channels, eps, affine)
        self._init_fused(channels_last, act, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_norm(x, self._normalize)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        per_group = (self.num_channels // self.num_groups) * elements_per_channel(x)
        if per_group < 2:
            raise ValueError(
                f"{self._where()} normalizes over a single value per group (input shape "
                f"{tuple(x.shape)}, {self.num_groups} groups): the output would be constant. "
                f"Use fewer groups or exclude this layer from the conversion.")
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._layout_repr()


class GroupNorm1(GroupNorm):
    """GroupNorm with one group: "LayerNorm" over (C, *positions) per sample with a per-channel affine (GroupNorm, G = 1)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 channels_last: bool = False, act: nn.Module | None = None,
                 drop: nn.Module | None = None):
        super().__init__(num_channels, 1, eps, affine, channels_last=channels_last, act=act, drop=drop)
