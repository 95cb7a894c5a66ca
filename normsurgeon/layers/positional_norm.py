"""Positional Normalization (Li et al., NeurIPS 2019): normalize over channels at each position.

Per sample n and position p:
    y_c = γ_c (x_c − μ_{n,p}) / sqrt(σ²_{n,p} + eps) + β_c,  μ, σ² over the C channels.
This is exactly what a transformer's ``nn.LayerNorm(C)`` does to each token, and what timm's
``LayerNorm2d`` does to NCHW maps, so it subclasses ``nn.LayerNorm`` (same keys, isinstance).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusedActLayout, channels_to_first, channels_to_last


class PositionalNorm(FusedActLayout, nn.LayerNorm):
    """Normalization over C at each (sample, position), per-channel affine, either layout."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 channels_last: bool = False, act: nn.Module | None = None,
                 drop: nn.Module | None = None):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)
        self.num_channels = num_channels
        self._init_fused(channels_last, act, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2:
            raise ValueError(f"{self._where()} expects (N, C, *) or (N, *, C), got {tuple(x.shape)}")
        if x.shape[-1 if self.channels_last else 1] < 2:
            raise ValueError(f"{self._where()} normalizes over a single channel: output would be constant")
        if self.channels_last:
            y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            y = channels_to_first(F.layer_norm(channels_to_last(x), self.normalized_shape, self.weight,
                                               self.bias, self.eps))
        return self._epilogue(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._layout_repr()
