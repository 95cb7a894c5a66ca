"""Synchronized Cross-Iteration BN and Memorized BN: the windows and memories hold global statistics.

CBN (``SyncedCrossIterationBatchNorm``). The current batch's μ_t, σ²_t are synced (``synced_moments``)
*before* they enter the window, so the pooled statistics
    μ̄ = (μ_t + Σ_i v_i μ_i)/n,   σ̄² = (σ²_t + (μ_t − μ̄)² + Σ_i v_i (σ²_i + (μ_i − μ̄)²))/n,   n = 1 + Σ_i v_i
are the same on every rank, and their gradient reaches every rank's x through the all-reduce of
``SyncedMoments`` (autograd of the formula above: the exact derivative, as ``_WindowNorm``'s closed form).
The entry pushed into the window must be the global batch's too, with its compensation derivatives.
Rank r holds M_r output positions m (patch_m: the conv input window of position m), M = Σ_r M_r:
    ∂μ/∂W_c  = (1/M) Σ_r Σ_{m∈r} patch_m = Σ_r (M_r/M) p̄_r,
    ∂σ²/∂W_c = (2/M) Σ_r Σ_{m∈r} (y_{c,m} − μ_c) patch_m
             = Σ_r (M_r/M) [∂σ²_r/∂W_c + 2 (μ_{r,c} − μ_c) p̄_r]        (μ, σ² global; μ_r, σ²_r, p̄_r local),
since Σ_{m∈r} (y − μ) patch = Σ_{m∈r} (y − μ_r) patch + M_r (μ_r − μ) p̄_r. Each rank computes its
share of the first form directly (centred on the *global* μ, divided by the *global* M) and one
all-reduce (sum) of the flattened (p̄, ∂σ²/∂W) gives the global derivatives. So a CBN layer makes two
collectives in a pushing forward (moments all-gather, derivatives all-reduce) and one in backward.
The window's compensation then uses the same conv weights (identical under DDP) on the same entries
on every rank: windows stay identical.

MBN (``SyncedMemorizedBatchNorm``): μ_0, σ²_0 of the current batch are global, so the memory holds
global statistics; the double forward (``refreshing``) and recalibration's accumulation are synced
too. The Batch-Renormalization gradient (``memorized_bn``) then flows through the global μ_0, σ_0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..layers._conv_statistics import conv_geometry, weight_derivatives
from ..layers.running_statistics import running_factor, update_running
from ..layers.cross_iteration_bn import CrossIterationBatchNorm
from ..layers.memorized_bn import MemorizedBatchNorm
from .synced_layers import SyncedStatistics, affine_normalize, cast_to, as_rows, in_float, synced_batch_norm


class SyncedCrossIterationBatchNorm(SyncedStatistics, CrossIterationBatchNorm):
    """``CrossIterationBatchNorm`` whose current-batch statistics and window entries are global."""

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type == "meta":
            return super()._normalize(x)
        tap, self._tap = self._tap, None
        self._note_training_forward()
        self._check_input_dim(x)
        if self.window == 1 or self._burning_in or self._recalibrating:
            return synced_batch_norm(self, x)  # BatchNorm exactly, over every rank
        if x.ndim != 4:
            raise ValueError(f"{self._where()} expects the (N, C, H, W) output of a Conv2d, got {tuple(x.shape)}")
        if tap is None or tap[2] is not x:
            raise RuntimeError(f"{self._where()} needs the input of its conv to compensate statistics across "
                               f"iterations, but its input is not that conv's output from this forward. Call it "
                               f"right after its conv (as normsurgeon.convert(model, to='cbn') wires it).")
        conv, conv_input = tap[0], tap[1]
        work = in_float(x)
        mean_t, var_t, count = self._global_moments(as_rows(work, x.shape[1]), x, update=False)
        past_mean, past_var = self._compensated(conv.weight, conv.bias, self.rho)
        past_mean, past_var, valid, weight, bias = cast_to(work.dtype, past_mean, past_var, self.past_valid.clone(),
                                                         self.weight, self.bias)
        pool = valid.sum() + 1
        mean = (mean_t + past_mean.t() @ valid) / pool
        spread = (past_var + (past_mean - mean).square()).t() @ valid
        var = (var_t + (mean_t - mean).square() + spread) / pool
        out = affine_normalize(work, mean, var, weight, bias, self.eps).to(x.dtype)
        factor = running_factor(self, x)
        update_running(self, mean_t.detach(), var_t.detach(), count, factor)
        if torch.is_grad_enabled():
            self._synced_push(conv, conv_input, work, mean_t.detach(), var_t.detach(), count)
        return out

    @torch.no_grad()
    def _synced_push(self, conv, conv_input: torch.Tensor, work: torch.Tensor, mean: torch.Tensor,
                     var: torch.Tensor, count: float) -> None:
        """The global entry: (μ_t, σ²_t) and this rank's share of the global derivatives, all-reduced."""
        dtype = self.past_var_grad.dtype
        patch = self.past_mean_patch.new_zeros((self.groups,) + self.weight_shape[1:])
        grad = self.past_var_grad.new_zeros(self.weight_shape)
        if work.shape[0] > 0:
            centered = work.detach().to(dtype) - mean.to(dtype).view(1, -1, 1, 1)
            geo = conv_geometry(conv, conv_input.detach().to(dtype))
            weight_derivatives(geo, centered, torch.Size(self.weight_shape), count, out=(patch, grad))
        flat = torch.cat([patch.flatten(), grad.flatten()])
        dist.all_reduce(flat, group=self._group())
        slot = self._head if self._head is not None else int(self.past_head)
        self.past_mean_patch[slot].copy_(flat[:patch.numel()].view(self.groups, -1))
        self.past_var_grad[slot].copy_(flat[patch.numel():].view(self.num_features, -1))
        self.past_mean[slot].copy_(mean)
        self.past_var[slot].copy_(var)
        self.past_valid[slot] = 1.0
        self._head = (slot + 1) % (self.window - 1)
        self.past_head.fill_(self._head)


class SyncedMemorizedBatchNorm(SyncedStatistics, MemorizedBatchNorm):
    """``MemorizedBatchNorm`` whose memory holds global statistics (double forward synced too)."""

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type == "meta":
            return super()._normalize(x)
        self._check_input_dim(x)
        work = in_float(x)
        if self.refreshing:
            with torch.no_grad():
                mean_t, var_t, _ = self._global_moments(as_rows(work, x.shape[1]), x, update=False)
                return self._refresh(x, mean_t, var_t)
        self._note_training_forward()
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        mean_t, var_t, count = self._global_moments(as_rows(work, x.shape[1]), x, update=False)
        if self._recalibration is not None:
            self._accumulate(mean_t.detach(), var_t.detach(), int(count))
        weight, bias = cast_to(work.dtype, self.weight, self.bias)
        if self.memory == 1:
            out = affine_normalize(work, mean_t, var_t, weight, bias, self.eps)
            self._push(mean_t.detach(), var_t.detach())
            return out.to(x.dtype)
        return self._normalize_with_memory(x, work, mean_t, var_t, weight, bias)
