"""InstanceNorm with a per-channel affine and no running statistics, in either layout.

Per sample n and channel c, over the positions only:
    y = γ_c (x − μ_{n,c}) / sqrt(σ²_{n,c} + eps) + β_c.
Batch-independent, train = eval. Undefined with a single position (the output would be β):
that is an error, never a silent constant.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusedActLayout, elements_per_channel


class InstanceNorm(FusedActLayout, nn.Module):
    """Instance normalization over positions per (sample, channel), per-channel affine."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 channels_last: bool = False, act: nn.Module | None = None,
                 drop: nn.Module | None = None):
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._init_fused(channels_last, act, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_norm(x, self._normalize)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if elements_per_channel(x) < 2:
            raise ValueError(
                f"{self._where()} got one position per channel (input shape {tuple(x.shape)}): "
                f"instance statistics are undefined. Exclude this layer or pick another target.")
        # GroupNorm with one channel per group is exactly this, and faster than F.instance_norm
        return F.group_norm(x, self.num_channels, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}{self._layout_repr()}"
