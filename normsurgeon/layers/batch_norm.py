"""BatchNorm in any layout, and a frozen BatchNorm.

``BatchNorm``: per channel c, over the batch and all positions,
    y = γ_c (x − μ_c) / sqrt(σ²_c + eps) + β_c,
with batch statistics (μ, σ² biased) in training and the running statistics in eval, exactly
as ``torch.nn.BatchNorm2d`` (same momentum semantics, ``momentum=None`` = cumulative average).
It accepts (N, C, *) of any rank, or (N, *, C) when ``channels_last``. A layer built without
statistics to start from (``statistics_pending=True``) takes its running statistics from its
first training batch (momentum 1 once), instead of averaging real statistics with the
meaningless initial (0, 1). A forward on meta tensors (``convert``'s shape checks) computes no
statistics: it leaves ``statistics_pending`` as it was, and with ``momentum=None`` it skips the
cumulative-average factor (1/num_batches_tracked cannot be read from a meta tensor).

``FrozenBatchNorm``: the same affine map with fixed statistics in train and eval,
    y = x · γ/sqrt(var + eps) + (β − mean · γ/sqrt(var + eps)).
All four tensors are buffers (as torchvision's ``FrozenBatchNorm2d``) unless
``trainable_affine=True``, which makes γ, β Parameters: the "freeze the statistics, train the
affine" recipe common in detection fine-tuning. The statistics are then Parameters with
``requires_grad=False`` (same state_dict keys): Opacus refuses any buffer in a trainable layer,
and frozen constants are no private state. Do not switch them on with ``requires_grad_(True)``
over the whole model.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import FusedActLayout, elements_per_channel


class PendingStatistics:
    """Mixin for batch-statistics layers built without statistics to start from: while
    ``statistics_pending``, the first training batch sets the running statistics (momentum 1
    once). Loading a state_dict clears it: loaded statistics are real ones. A forward on meta
    tensors (shape checks) does not: it computes no statistics to take."""

    statistics_pending: bool = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.statistics_pending = False

    def _take_pending(self, x: torch.Tensor) -> bool:
        """True exactly once, on the first real (not meta) training step of a pending layer."""
        if self.statistics_pending and self.training and self.track_running_stats and x.device.type != "meta":
            self.statistics_pending = False
            return True
        return False


class BatchNorm(PendingStatistics, FusedActLayout, nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, *positions) per channel, any rank, either layout, fused drop/act.

    A subclass of ``_BatchNorm``: state_dict keys and tools that look for BatchNorm
    (``torch.optim.swa_utils.update_bn``) work unchanged.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 channels_last: bool = False, act: nn.Module | None = None,
                 drop: nn.Module | None = None, statistics_pending: bool = False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self._init_fused(channels_last, act, drop)
        self.statistics_pending = statistics_pending

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{self._where()} expects {self.num_features} channels on axis "
                             f"{-1 if self.channels_last else 1}, got input of shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_norm(x, self._normalize)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        uses_batch_stats = self.training or not self.track_running_stats
        if uses_batch_stats and x.shape[0] * elements_per_channel(x) < 2:
            raise ValueError(
                f"{self._where()} needs batch statistics but got one value per channel "
                f"(input shape {tuple(x.shape)}): use a batch of 2 or more, call model.eval(), "
                f"or convert this layer to a batch-independent target ('frozen_bn', 'gn', 'ln').")
        if self._take_pending(x):
            override = 1.0
        elif self.momentum is None and x.device.type == "meta":
            override = 0.0  # shape check: torch's cumulative average would read num_batches_tracked
        else:
            return super().forward(x)
        momentum, self.momentum = self.momentum, override
        try:
            return super().forward(x)
        finally:
            self.momentum = momentum

    def extra_repr(self) -> str:
        return super().extra_repr() + self._layout_repr()


class FrozenBatchNorm(FusedActLayout, nn.Module):
    """BatchNorm with fixed statistics (identical in train and eval), any rank and layout."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, trainable_affine: bool = False,
                 channels_last: bool = False, act: nn.Module | None = None,
                 drop: nn.Module | None = None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.trainable_affine = trainable_affine
        if trainable_affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
        if trainable_affine:  # no buffer in a trainable layer (DP-SGD, see the module docstring)
            self.running_mean = nn.Parameter(torch.zeros(num_features), requires_grad=False)
            self.running_var = nn.Parameter(torch.ones(num_features), requires_grad=False)
        else:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
        self._init_fused(channels_last, act, drop)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # BatchNorm checkpoints carry a step counter that has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_norm(x, self._normalize)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_expanded_weights()
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        view = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(shift.view(view), x, scale.view(view))

    def extra_repr(self) -> str:
        extra = ", trainable_affine=True" if self.trainable_affine else ""
        return f"{self.num_features}, eps={self.eps}{extra}{self._layout_repr()}"
