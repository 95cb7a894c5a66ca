"""Memorized Batch Normalization with Double-Forward (Guo, Wu, Deng, Chen, Tan, AAAI 2018).

x is (N, C, *positions) (or (N, *, C) with ``channels_last``). A memory holds the per-channel
statistics (μ_j, σ²_j, biased) of the last k = ``memory`` batches, newest first (j = 0).

Training, batch B_t: the statistics are a weighted pool of the current batch (j = 0, with
gradients) and the k − 1 newest memory entries (j = 1..k−1, constants):
    w_j = decay^j / Σ_i decay^i  (over entries that hold data),
    μ̄ = Σ_j w_j μ_j,   σ̄² = Σ_j w_j σ²_j + Σ_j w_j (μ_j − μ̄)²   (the pooled mixture variance),
    y = γ (x − μ̄)/sqrt(σ̄² + eps) + β.
Gradient: the memory entries are constants, and the current batch's (μ_0, σ_0) get BatchNorm's
full gradient, as in Batch Renormalization (Ioffe, NeurIPS 2017, §3):
    y = γ ((x − μ_0)/σ_0 · r + d) + β,   r = σ_0/σ̄, d = (μ_0 − μ̄)/σ̄ held constant,
which has the value above. The literal derivative of the pooled formula would scale the
current batch's share by w_0 (1/k): the gradient then keeps most of its component along
directions that shift or rescale the batch's features, which BatchNorm projects out; the
normalization lags behind (Ioffe & Szegedy 2015, §2) and training failed (small-batch
study: about 40% against BN's 98% on digits, at both batch sizes).
Then B_t's (detached) statistics are pushed as the newest memory entry. After the optimizer
step, ``normsurgeon.after_step(model, inputs)`` re-runs B_t without gradients under the updated
weights ("double forward"); this layer then *overwrites* the newest entry with B_t's statistics
recomputed under θ_{t+1}. Inference pools the k newest memory entries with the same weights
(the newest entry in the current batch's role), so the train and test rules are the same rule.
The pooled memory statistics are mirrored into ``running_mean``/``running_var`` after every
memory change, so eval is a plain BatchNorm on them (fast; export tools that fold BN into the
conv see the right numbers). k = 1 is BatchNorm in training.

What is the paper's (from its abstract; no public code exists): a memory of the statistics of
multiple recent batches used in training, gradients through the current batch only, the
double-forward refresh after each update, and inference with the memorized statistics so that
training and inference are consistent.
What is ours: the memory holds (mean, biased variance) and pools them as a mixture (not raw
E[x²], which cancels badly in float32); the weights decay^j with default ``decay = 1``
(uniform) and ignore batch sizes; ``memory`` counts the current batch (k = 1 is BN); the
training forward stores a provisional entry that the refresh replaces (so a loop without the
hook degrades to averaging stale statistics, and is warned about); ``momentum`` is unused
(kept for ``_BatchNorm`` compatibility); the Batch-Renormalization gradient above;
``reset_running_stats()`` also empties the memory; ``normsurgeon.recalibrate_bn`` fills *every*
entry with the population statistics of its data under the current weights (the exact mean
and biased variance of all its elements; ``begin_recalibration``/``end_recalibration``), so
eval after recalibration normalizes with them; a layer converted from a pretrained BatchNorm
starts with all k entries at the running statistics (eval-preserving), one converted from a
BatchNorm that never saw a batch (``num_batches_tracked`` = 0) with an empty memory.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._stateful import StepHookClient
from .base import elements_per_channel
from .running_statistics import require_two_values
from .batch_norm import BatchNorm


class MemorizedBatchNorm(StepHookClient, BatchNorm):
    """MBN: BatchNorm over a decay-weighted memory of the last ``memory`` batches (see module doc)."""

    refreshes_after_step = True  # normsurgeon.after_step re-runs the batch (double forward)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, memory: int = 4,
                 decay: float = 1.0, channels_last: bool = False, act: nn.Module | None = None,
                 drop: nn.Module | None = None):
        if not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory={memory!r}: the number of batches pooled (current + past), an int >= 1")
        if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise ValueError(f"decay={decay!r}: the weight ratio of consecutive memory entries, in (0, 1]")
        if not track_running_stats:
            raise ValueError("MemorizedBatchNorm infers with its memory; track_running_stats=False has no "
                             "meaning here (use 'bn' for a BatchNorm on batch statistics in eval)")
        self.memory, self.decay = memory, float(decay)
        super().__init__(num_features, eps, momentum, affine, True, channels_last=channels_last,
                         act=act, drop=drop)
        self.register_buffer("memory_mean", torch.zeros(memory, num_features))
        self.register_buffer("memory_var", torch.ones(memory, num_features))
        self.register_buffer("memory_valid", torch.zeros(memory))
        self.refreshing = False
        self._recalibration: dict | None = None  # accumulators while recalibrate_bn runs

    # -- state --------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """BatchNorm's reset, and an empty memory (recalibration refills it)."""
        super().reset_running_stats()
        if hasattr(self, "memory_valid"):
            self.memory_mean.zero_()
            self.memory_var.fill_(1.0)
            self.memory_valid.zero_()

    @torch.no_grad()
    def seed_memory(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Fill all k entries with (mean, var), e.g. a pretrained BatchNorm's running statistics."""
        self.memory_mean.copy_(mean.expand_as(self.memory_mean))
        self.memory_var.copy_(var.expand_as(self.memory_var))
        self.memory_valid.fill_(1.0)
        self._mirror()

    def _weights(self, valid: torch.Tensor) -> torch.Tensor:
        powers = self.decay ** torch.arange(valid.numel(), dtype=valid.dtype, device=valid.device)
        return powers * valid

    @torch.no_grad()
    def memorized_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ̄, σ̄²) pooled over the memory with the decay weights: the inference statistics."""
        w = self._weights(self.memory_valid)
        total = w.sum()
        w = (w / total.clamp_min(torch.finfo(w.dtype).tiny)).unsqueeze(1)
        mean = (w * self.memory_mean).sum(0)
        var = (w * self.memory_var).sum(0) + (w * (self.memory_mean - mean).square()).sum(0)
        return mean, var

    @torch.no_grad()
    def _mirror(self) -> None:
        """running_mean/var ← the pooled memory (left alone while the memory is empty)."""
        mean, var = self.memorized_statistics()
        has_data = self.memory_valid.sum() > 0
        self.running_mean.copy_(torch.where(has_data, mean, self.running_mean))
        self.running_var.copy_(torch.where(has_data, var, self.running_var))

    @torch.no_grad()
    def _push(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            # Under torch.compile the memory is replaced by updated tensors, not written in place: the
            # training forward reads it for the pooled statistics, and AOTAutograd may recompute those
            # cheap ops in the backward from the already-written buffer (wrong gradients; see CBN).
            self.memory_mean = torch.cat([mean.to(self.memory_mean.dtype).unsqueeze(0), self.memory_mean[:-1]])
            self.memory_var = torch.cat([var.to(self.memory_var.dtype).unsqueeze(0), self.memory_var[:-1]])
            self.memory_valid = torch.cat([self.memory_valid.new_ones(1), self.memory_valid[:-1]])
            self._mirror()
            return
        for buf, value in ((self.memory_mean, mean), (self.memory_var, var)):
            if self.memory > 1:
                buf[1:] = buf[:-1].clone()
            buf[0] = value.to(buf.dtype)
        if self.memory > 1:
            self.memory_valid[1:] = self.memory_valid[:-1].clone()
        self.memory_valid[0] = 1.0
        self._mirror()

    @torch.no_grad()
    def _refresh_newest(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Double forward: the newest entry becomes this batch under the updated weights."""
        self.memory_mean[0] = mean.to(self.memory_mean.dtype)
        self.memory_var[0] = var.to(self.memory_var.dtype)
        self.memory_valid[0] = 1.0
        self._mirror()

    # -- recalibration protocol (normsurgeon.recalibrate_bn) ----------------------------------
    @torch.no_grad()
    def begin_recalibration(self) -> None:
        """Accumulate the statistics of the training forwards until ``end_recalibration``.

        The forwards normalize as in training (pooled with the memory, which slides over the
        recalibration batches); only the accumulated population statistics are kept at the end.
        """
        zeros = torch.zeros(self.num_features, dtype=torch.float64, device=self.memory_mean.device)
        self._recalibration = {"n": 0, "sum": zeros, "sum_sq": zeros.clone(),
                               "saved": [b.clone() for b in self._recalibrated_buffers()]}

    @torch.no_grad()
    def end_recalibration(self, completed: bool = True) -> None:
        """Every memory entry ← the accumulated (mean, biased variance); the previous state when
        the layer saw no batch or ``completed`` is False (an error stopped the recalibration)."""
        acc, self._recalibration = self._recalibration, None
        if acc is None:
            return
        if not completed or acc["n"] == 0:
            for buf, value in zip(self._recalibrated_buffers(), acc["saved"]):
                buf.copy_(value)
            return
        mean = acc["sum"] / acc["n"]
        var = (acc["sum_sq"] / acc["n"] - mean.square()).clamp_min(0)
        self.seed_memory(mean.to(self.memory_mean.dtype), var.to(self.memory_var.dtype))

    def _recalibrated_buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.memory_mean, self.memory_var, self.memory_valid, self.running_mean, self.running_var)

    @torch.no_grad()
    def _accumulate(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        acc, mean = self._recalibration, mean.double()
        acc["sum"] += count * mean
        acc["sum_sq"] += count * (var.double() + mean.square())
        acc["n"] += count

    # -- step hook protocol -------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        self._note_step()

    def _missing_hook_consequence(self) -> str:
        return ("Memorized BN refreshes its memory with a second forward of the batch after each step: "
                "without it the memory holds statistics of outdated weights.")

    # -- forward ------------------------------------------------------------------------------
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super()._normalize(x)  # BatchNorm on running stats = the pooled memory
        self._check_input_dim(x)
        require_two_values(self, x, x.shape[0] * elements_per_channel(x))
        dims = (0,) + tuple(range(2, x.ndim))
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if self.refreshing:
            with torch.no_grad():
                var_t, mean_t = torch.var_mean(work, dim=dims, unbiased=False)
                return self._refresh(x, mean_t, var_t)
        self._note_training_forward()
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        var_t, mean_t = torch.var_mean(work, dim=dims, unbiased=False)
        if self._recalibration is not None:
            self._accumulate(mean_t.detach(), var_t.detach(), x.shape[0] * elements_per_channel(x))
        if self.memory == 1:
            out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            self._push(mean_t.detach(), var_t.detach())
            return out
        return self._normalize_with_memory(x, work, mean_t, var_t, self.weight, self.bias)

    def _refresh(self, x: torch.Tensor, mean_t: torch.Tensor, var_t: torch.Tensor) -> torch.Tensor:
        """The double forward's second pass: the newest memory entry becomes this batch's (μ_t, σ²_t),
        each (C,), and x is normalized with the refreshed pooled statistics."""
        self._refresh_newest(mean_t, var_t)
        self._forwards_since_step = 0
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _normalize_with_memory(self, x: torch.Tensor, work: torch.Tensor, mean_t: torch.Tensor, var_t: torch.Tensor,
                               weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """γ (x − μ̄)/σ̄ + β for x (N, C, *) in ``work``'s dtype, with (μ̄, σ̄²) pooled from the batch's
        (μ_0, σ_0²) = (``mean_t``, ``var_t``), each (C,), and the memory; then the batch is pushed."""
        with torch.no_grad():
            past = slice(0, self.memory - 1)  # the k − 1 newest entries play j = 1..k−1
            valid = torch.cat([self.memory_valid.new_ones(1), self.memory_valid[past]]).to(work.dtype)
            w = self._weights(valid)
            w = (w / w.sum()).unsqueeze(1)
            means = torch.cat([mean_t.unsqueeze(0), self.memory_mean[past].to(work.dtype)])
            variances = torch.cat([var_t.unsqueeze(0), self.memory_var[past].to(work.dtype)])
            mean = (w * means).sum(0)
            var = (w * variances).sum(0) + (w * (means - mean).square()).sum(0)
            inv = torch.rsqrt(var + self.eps)
        # Value γ (x − μ̄)/σ̄ + β; gradient BatchNorm's through (μ_0, σ_0) (module doc, "Gradient"):
        # y = γ ((x − μ_0)/σ_0 · r + d) + β with r = σ_0/σ̄ and d = (μ_0 − μ̄)/σ̄ constants.
        inv_t = torch.rsqrt(var_t + self.eps)
        r = (inv / inv_t).detach()
        d = (mean_t.detach() - mean) * inv
        scale = inv_t * r
        shift = d - mean_t * scale
        if weight is not None:
            scale, shift = scale * weight, shift * weight
        if bias is not None:
            shift = shift + bias
        view = (1, -1) + (1,) * (x.ndim - 2)
        out = torch.addcmul(shift.view(view), work, scale.view(view)).to(x.dtype)
        self._push(mean_t.detach(), var_t.detach())
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", memory={self.memory}, decay={self.decay}"
