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


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. Under torch's expanded weights
    (Opacus's ``grad_sample_mode="ew"``) the conv feeding this layer ``view``s its grad_output,
    which fails on the permuted gradient that layer_norm over a channels-first input sends back."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


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
            if type(self.weight).__name__ == "ExpandedWeight":
                x = _ContiguousGradient.apply(x)
            # the explicit copies: layer_norm makes its input contiguous anyway (torch's expanded
            # weights, Opacus's 'ew', require it); the output gets the input's layout instead of
            # a channels-last view (Opacus's conv grad sampler silently misreads such inputs)
            y = channels_to_first(F.layer_norm(channels_to_last(x).contiguous(), self.normalized_shape,
                                               self.weight, self.bias, self.eps))
            if x.is_contiguous():
                y = y.contiguous()
        return self._epilogue(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._layout_repr()
