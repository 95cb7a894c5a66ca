"""BatchNorm's running-statistics protocol, shared by the batch-statistics layers (bgn, iebn, cbn, mbn).

``_BatchNorm.forward`` semantics written out once: the update factor of a training call (EMA
``momentum``, or the cumulative 1/num_batches_tracked when momentum is None), the update
running ← (1 − f)·running + f·batch with the unbiased variance σ²·M/(M − 1), when batch statistics
are used (training, or no running statistics), and the error for a statistic over one value.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .batch_norm import PendingStatistics


def running_factor(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> float:
    """``_BatchNorm.forward``'s update factor for this call on input ``x``; counts a training batch.

    EMA factor ``momentum``, or 1/num_batches_tracked (cumulative average) when momentum is None;
    1 on the first training batch of a layer with ``statistics_pending``. On meta tensors (shape
    checks) no value exists: the cumulative factor is not read and a pending flag stays set.
    """
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None and x.device.type != "meta":
            factor = 1.0 / float(module.num_batches_tracked)
    if isinstance(module, PendingStatistics) and module._take_pending(x):
        factor = 1.0
    return factor


def uses_batch_statistics(module: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether a forward normalizes with batch statistics: in training, or without running statistics."""
    return module.training or (module.running_mean is None and module.running_var is None)


def update_running(module: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                   count: int, factor: float) -> None:
    """BatchNorm's update in training (nothing otherwise): running ← (1 − f)·running + f·batch,
    with the variance made unbiased, σ²·M/(M − 1), M = ``count`` values per statistic."""
    if not (module.training and module.track_running_stats):
        return
    with torch.no_grad():
        module.running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        module.running_var.mul_(1.0 - factor).add_(var, alpha=factor * count / (count - 1))


def batch_norm_without_affine(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``_BatchNorm.forward``'s statistics logic on (N, K, *) with K = len(running_mean), no affine."""
    factor = running_factor(module, x)
    track = not module.training or module.track_running_stats
    return F.batch_norm(x, module.running_mean if track else None, module.running_var if track else None,
                        None, None, uses_batch_statistics(module), factor, module.eps)


def require_two_values(module, x: torch.Tensor, per_statistic: int) -> None:
    """A clear ValueError when batch statistics would be taken over fewer than 2 values each."""
    if (module.training or not module.track_running_stats) and per_statistic < 2:
        raise ValueError(
            f"{module._where()} needs batch statistics but got one value per statistic (input shape "
            f"{tuple(x.shape)}): use a batch of 2 or more, call model.eval(), or convert this layer "
            f"to a batch-independent target ('frozen_bn', 'gn', 'ln').")
