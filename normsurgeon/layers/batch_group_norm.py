"""Batch Group Normalization (Zhou et al. 2020) and Instance-Enhancement BN (Liang et al. 2020).

Both are batch-statistics norms with BatchNorm's running-statistics semantics (EMA with
``momentum``, cumulative average with ``momentum=None``, unbiased running variance). With batch
statistics (training, or ``track_running_stats=False``) they run as one custom autograd Function
each (``_group_statistics.py``: y = K·x + L per (n, c), native reductions, first-order gradients
only — double backward raises); with running statistics, as plain differentiable torch ops.

``BatchGroupNorm``: x (N, C, *) viewed as (N, G, C·P/G), channels split into G contiguous
groups; per group g, mean and (biased) variance over the batch and the group's C/G channels
and P positions together (N·C·P/G values); then a per-channel affine:
    y_{n,c,p} = γ_c (x_{n,c,p} − μ_g) / sqrt(σ²_g + eps) + β_c,   g = c // (C/G).
G = C is exactly BatchNorm; G = 1 pools everything. Running statistics are per group (G,).

``InstanceEnhancementBatchNorm``: s_{n,c} = mean over positions of the *input*,
a_{n,c} = sigmoid(w_c·s_{n,c} + b_c), x̂ = BatchNorm without affine,
    y = x̂ · γ_c · a_{n,c} + β_c.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusedActLayout, elements_per_channel
from ._group_statistics import BatchGroupNormFunction, InstanceEnhancementFunction
from .batch_norm import PendingStatistics
from .running_statistics import (batch_norm_without_affine, require_two_values, running_factor, update_running,
                                 uses_batch_statistics)


def _fused_dtype_ok(module: nn.Module, x: torch.Tensor) -> bool:
    """The fused paths need one dtype throughout, float32 or float64. Other inputs (half,
    bfloat16, mixed precision) take the unfused ops (``_normalize_unfused``), unchanged from the
    original implementation: the native batch-norm kernel keeps their statistics in float32."""
    return x.dtype in (torch.float32, torch.float64) and all(
        t.dtype == x.dtype for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
        if t.is_floating_point())


class BatchGroupNorm(PendingStatistics, FusedActLayout, nn.modules.batchnorm._BatchNorm):
    """BGN: batch statistics per group of C/G channels, per-channel affine (equations above).

    A ``_BatchNorm`` over G features (running statistics are (G,)), so BatchNorm tools such as
    ``torch.optim.swa_utils.update_bn`` recalibrate it too; γ, β are (C,).
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 *, channels_last: bool = False, act: nn.Module | None = None,
                 drop: nn.Module | None = None):
        if num_groups < 1 or num_groups > num_channels or num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels} "
                             f"(G > C would split a channel's positions, which depends on the input size)")
        super().__init__(num_groups, eps, momentum, affine=False, track_running_stats=track_running_stats)
        self.num_channels, self.num_groups, self.affine = num_channels, num_groups, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        self._init_fused(channels_last, act, drop)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"{self._where()} expects {self.num_channels} channels, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_norm(x, self._normalize)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        n, c, g = x.shape[0], self.num_channels, self.num_groups
        count = n * c // g * elements_per_channel(x)  # M: values per group statistic
        require_two_values(self, x, count)
        if not _fused_dtype_ok(self, x):
            return self._normalize_unfused(x)
        if not uses_batch_statistics(self):
            # Running statistics: plain BatchNorm with each group's statistics repeated over
            # its C/G channels, affine folded in by the native kernel (one pass).
            return F.batch_norm(x, self.running_mean.repeat_interleave(c // g),
                                self.running_var.repeat_interleave(c // g),
                                self.weight, self.bias, False, 0.0, self.eps)
        factor = running_factor(self, x)
        y, mean, var = BatchGroupNormFunction.apply(x, self.weight, self.bias, g, self.eps)
        update_running(self, mean, var, count, factor)
        return y

    def _normalize_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """Native batch norm on the (N, G, C·P/G) view, then the per-channel affine."""
        y = batch_norm_without_affine(self, x.reshape(x.shape[0], self.num_groups, -1)).view_as(x)
        if self.weight is None:
            return y
        view = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.bias.view(view), y, self.weight.view(view))

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}{self._layout_repr()}")


class InstanceEnhancementBatchNorm(PendingStatistics, FusedActLayout, nn.modules.batchnorm._BatchNorm):
    """IEBN: BatchNorm whose γ is rescaled per sample by sigmoid(w·GAP(input) + b)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 track_running_stats: bool = True, *, channels_last: bool = False,
                 act: nn.Module | None = None, drop: nn.Module | None = None):
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=track_running_stats)
        self.attention_weight = nn.Parameter(torch.zeros(num_features))
        self.attention_bias = nn.Parameter(torch.full((num_features,), -1.0))
        self._init_fused(channels_last, act, drop)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 3 or x.shape[1] != self.num_features:
            raise ValueError(f"{self._where()} expects (N, {self.num_features}, *positions), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_norm(x, self._normalize)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        count = x.shape[0] * elements_per_channel(x)  # M: values per channel statistic
        require_two_values(self, x, count)
        if not _fused_dtype_ok(self, x):
            return self._normalize_unfused(x)
        if not uses_batch_statistics(self):
            # Running statistics: y = K·x + L, K = γ·a·r, L = β − μ·K per (n, c), r = 1/sqrt(σ² + eps).
            view = x.shape[:2] + (1,) * (x.ndim - 2)
            context = x.mean(dim=tuple(range(2, x.ndim)))  # (N, C)
            gate = torch.sigmoid(torch.addcmul(self.attention_bias, context, self.attention_weight))
            k = self.weight * gate * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * k
            return torch.addcmul(shift.view(view), x, k.view(view))
        factor = running_factor(self, x)
        y, mean, var = InstanceEnhancementFunction.apply(
            x, self.weight, self.bias, self.attention_weight, self.attention_bias, self.eps)
        update_running(self, mean, var, count, factor)
        return y

    def _normalize_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """Context mean, native batch norm without affine, then the gated affine."""
        view = (x.shape[0], -1) + (1,) * (x.ndim - 2)
        context = x.mean(dim=tuple(range(2, x.ndim)))
        gate = torch.sigmoid(torch.addcmul(self.attention_bias, context, self.attention_weight))
        x_hat = batch_norm_without_affine(self, x)
        return torch.addcmul(self.bias.view((1, -1) + (1,) * (x.ndim - 2)), x_hat, (gate * self.weight).view(view))

    def extra_repr(self) -> str:
        return super().extra_repr() + self._layout_repr()
