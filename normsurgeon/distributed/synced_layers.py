"""Synchronized versions of the batch-statistics layers bn, bgn, iebn and dsbn.

Each is a subclass of the local layer that only replaces how the *batch* statistics are computed:
they come from ``synced_moments`` (every rank's batch, one all-gather forward, one all-reduce
backward), then the layer's own equation applies. Eval with running statistics, the layout and the
fused ``drop``/``act`` are the local layer's, unchanged. State_dict keys are the same, so
``normsurgeon.unsync`` only swaps the class back. The running statistics are updated from the global
statistics (unbiased with the global count M), so they are identical on every rank.

Per layer, x (N, C, *) channels-first (the layout is handled by ``FusedActLayout``), M = Σ_ranks N·P:
- bn:   μ, σ² per channel over every rank's (N, P);        y = γ (x − μ)/sqrt(σ² + eps) + β.
- bgn:  x viewed (N, G, C·P/G); μ_g, σ²_g per group;       y = γ_c (x − μ_g)/sqrt(σ²_g + eps) + β_c.
- iebn: μ, σ² synced as bn; the gate a_{n,c} = sigmoid(w_c·mean_p x_{n,c,p} + b_c) is per sample,
        local;                                              y = γ_c a_{n,c} (x − μ)/sqrt(σ² + eps) + β_c.
- dsbn: one piece per domain in the same collective (a domain absent on a rank is an empty piece,
        n = 0); domain k's running statistics move only if some rank had a sample of it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layers.batch_group_norm import BatchGroupNorm, InstanceEnhancementBatchNorm
from ..layers.running_statistics import running_factor, update_running, uses_batch_statistics
from ..layers.batch_norm import BatchNorm
from ..layers.domain_batch_norm import DomainSpecificBatchNorm
from .moments import require_process_group, synced_moments


class SyncedStatistics:
    """Mixin: ``process_group`` (None = the default group) and the checks every synced forward makes."""

    process_group = None

    def _group(self):
        require_process_group(self.process_group, f"{self._where()}'s synchronized statistics")
        return self.process_group

    def _need_two(self, total: float, x: torch.Tensor) -> None:
        """Every rank sees the same global count, so every rank raises together (no hang)."""
        if total < 2:
            raise ValueError(f"{self._where()} needs batch statistics but all ranks together gave "
                             f"{int(total)} value(s) per statistic (this rank's input: {tuple(x.shape)}): use "
                             f"2 or more samples over the ranks, or call model.eval()")

    def _global_moments(self, rows: torch.Tensor, x: torch.Tensor, update: bool = True):
        """Mean and variance (K,) of ``rows`` (N, K, M) over every rank and the global count per
        statistic, checked (≥ 2 values) and, with ``update``, folded into the running statistics."""
        mean, var, total = synced_moments(self._group(), rows)
        count = float(total[0])
        self._need_two(count, x)
        if update:
            update_running(self, mean[0].detach(), var[0].detach(), count, running_factor(self, x))
        return mean[0], var[0], count

    def __getstate__(self):
        # a process group cannot be pickled or deep-copied: a copy syncs over the default group
        state = dict(self.__dict__)
        state.pop("process_group", None)
        return state


def as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, *) → (N, K, C·P/K), also for N = 0 (where reshape cannot infer a -1)."""
    return x.reshape(x.shape[0], k, x[0].numel() // k if x.shape[0] else math.prod(x.shape[1:]) // k)


def in_float(x: torch.Tensor) -> torch.Tensor:
    """x itself in float32/float64, else x in float32 (statistics of half precision are taken in float)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def cast_to(dtype, *tensors) -> list:
    """Each tensor in ``dtype`` (None stays None)."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def affine_normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight, bias,
                     eps: float) -> torch.Tensor:
    """x (N, C, *), per-channel mean/var (C,) → γ (x − μ)/sqrt(σ² + eps) + β, differentiable in all."""
    view = (1, -1) + (1,) * (x.ndim - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(shift.view(view), x, scale.view(view))


def synced_batch_norm(layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm of ``layer`` on x (N, C, *) with statistics over every rank."""
    work = in_float(x)
    mean, var, _ = layer._global_moments(as_rows(work, x.shape[1]), x)
    weight, bias = cast_to(work.dtype, layer.weight, layer.bias)
    return affine_normalize(work, mean, var, weight, bias, layer.eps).to(x.dtype)


class SyncedBatchNorm(SyncedStatistics, BatchNorm):
    """``BatchNorm`` with batch statistics over every rank of ``process_group``."""

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not uses_batch_statistics(self) or x.device.type == "meta":
            return super()._normalize(x)
        self._check_input_dim(x)
        return synced_batch_norm(self, x)


class SyncedBatchGroupNorm(SyncedStatistics, BatchGroupNorm):
    """``BatchGroupNorm`` with group statistics over every rank of ``process_group``."""

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not uses_batch_statistics(self) or x.device.type == "meta":
            return super()._normalize(x)
        self._check_input_dim(x)
        work = in_float(x)
        mean, var, _ = self._global_moments(as_rows(work, self.num_groups), x)
        weight, bias = cast_to(work.dtype, self.weight, self.bias)
        per_channel = self.num_channels // self.num_groups
        return affine_normalize(work, mean.repeat_interleave(per_channel), var.repeat_interleave(per_channel),
                                 weight, bias, self.eps).to(x.dtype)


class SyncedInstanceEnhancementBatchNorm(SyncedStatistics, InstanceEnhancementBatchNorm):
    """``InstanceEnhancementBatchNorm``: BN statistics over every rank, the per-sample gate local."""

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not uses_batch_statistics(self) or x.device.type == "meta":
            return super()._normalize(x)
        self._check_input_dim(x)
        work = in_float(x)
        n, c = x.shape[:2]
        flat = as_rows(work, c)
        mean, var, _ = self._global_moments(flat, x)
        weight, bias, att_weight, att_bias = cast_to(work.dtype, self.weight, self.bias, self.attention_weight,
                                                   self.attention_bias)
        gate = torch.sigmoid(torch.addcmul(att_bias, flat.mean(2), att_weight))  # (N, C), local
        view = (n, c) + (1,) * (x.ndim - 2)
        scale = weight * gate * torch.rsqrt(var + self.eps)  # (N, C)
        shift = bias - mean * scale
        return torch.addcmul(shift.view(view), work, scale.view(view)).to(x.dtype)


class SyncedDomainSpecificBatchNorm(SyncedStatistics, DomainSpecificBatchNorm):
    """``DomainSpecificBatchNorm`` with each domain's statistics over every rank (one collective for
    all K domains; a domain this rank has no sample of takes part with n = 0)."""

    def _normalize(self, x: torch.Tensor, route) -> torch.Tensor:
        if not self.training or x.device.type == "meta":
            return super()._normalize(x, route)
        k_all = self.num_domains
        route_k = route if isinstance(route, int) else None
        if isinstance(route, int):
            order, counts = None, [x.shape[0] if k == route else 0 for k in range(k_all)]
            pieces = [x if k == route else x[:0] for k in range(k_all)]
        else:
            if route.shape != (x.shape[0],):
                return super()._normalize(x, route)  # the local layer's error message
            route = route.to(x.device)
            order = torch.argsort(route, stable=True)
            counts = torch.bincount(route, minlength=k_all).tolist()
            pieces = list(x.index_select(0, order).split(counts))
        work = [in_float(p) for p in pieces]
        n_flat = [as_rows(w, w.shape[1]) for w in work]
        mean, var, total = synced_moments(self._group(), *n_flat)
        outs = []
        for k in range(k_all):
            seen = float(total[k])
            if seen == 0 and k != route_k:
                continue  # no rank had a sample of domain k: its statistics stay
            if seen < 2:
                raise ValueError(f"{self._where()} needs batch statistics but domain {self.domains[k]!r} got "
                                 f"{int(seen)} value(s) per channel over all ranks: use 2 or more samples per "
                                 f"domain, or call model.eval()")
            self._update_domain(k, mean[k].detach(), var[k].detach(), seen)
            if counts[k] or k == route_k:  # (an empty rank still outputs its piece: its backward joins the all-reduce)
                weight, bias = self._affine(k)
                if weight is not None and weight.dtype != work[k].dtype:
                    weight, bias = weight.to(work[k].dtype), bias.to(work[k].dtype)
                outs.append(affine_normalize(work[k], mean[k], var[k], weight, bias, self.eps).to(x.dtype))
        if order is None:
            return outs[0]
        out = torch.cat(outs)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out.index_select(0, inverse)

    @torch.no_grad()
    def _update_domain(self, k: int, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Domain k's running statistics, as ``nn.BatchNorm`` with momentum (or cumulative average)."""
        self.num_batches_tracked[k].add_(1)
        momentum = self.momentum
        if momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked[k])
        if self.statistics_pending[k]:
            self.statistics_pending[k] = False
            momentum = 1.0
        self.running_mean[k].mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var[k].mul_(1 - momentum).add_(var.to(self.running_var.dtype) * (count / (count - 1)),
                                                    alpha=momentum)
