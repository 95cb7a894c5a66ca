"""Cross-Iteration Batch Normalization (Yao, Cao, Zheng, Huang, Lin, CVPR 2021).

The statistics of a BatchNorm fed by a conv are pooled over a window of ``window`` = k
iterations: the current batch plus the k − 1 previous ones, each *compensated* to the conv's
current weights θ_t = (W_t, b_t) by a first-order Taylor expansion (paper eq. 7–8):

    μ_{t−τ}(θ_t) ≈ μ_{t−τ} + ρ·∂μ/∂θ·(θ_t − θ_{t−τ}),    ν_{t−τ}(θ_t) ≈ ν_{t−τ} + ρ·∂ν/∂θ·(θ_t − θ_{t−τ})

with ν = E[y²]; ρ = 1 is the paper's method, ρ = 0 plain averaging (its ablation). Per entry
the paper clamps ν ≥ μ² (compensated variance ≥ 0), then
    μ̄ = mean_i μ_i,  σ̄² = mean_i max(ν_i, μ_i²) − μ̄²,  y = γ (x − μ̄)/sqrt(σ̄² + eps) + β.
Gradients flow only through the current batch's statistics; past entries are constants.

How it is computed here (numerically the same quantity, in a cancellation-free form):
- The derivatives are analytic (``_conv_statistics.py``): ∂μ_c/∂W_c is the mean input patch p̄
  of c's group, ∂σ²_c/∂W_c one conv weight-gradient (one matrix product over the im2col patches
  for small outputs), written straight into the window's slot; no extra autograd pass. The bias
  is part of θ (∂μ/∂b = 1, ∂σ²/∂b = 0).
- Entries store μ and the central σ², and the compensation is applied to σ² directly:
  ν_comp − μ_comp² = σ² + ρ·∂σ²/∂W·ΔW − (ρΔμ)² exactly, so no E[y²] − μ² cancellation in float32.
- No weight snapshot is stored: the terms of the old weights are known in closed form. The conv
  is linear, y_m = ⟨W_i, patch_m⟩ + b_i, so ⟨p̄_i, W_i⟩ + b_i = μ_i and, as Σ_m (y_m − μ_i) = 0,
  ⟨∂σ²_i/∂W, W_i⟩ = (2/M) Σ_m (y_m − μ_i)(y_m − b_i) = 2σ²_i. Hence
      Δμ_i = ⟨p̄_i, W_t⟩ + b_t − μ_i,     ∂σ²_i/∂W·(W_t − W_i) = ⟨∂σ²_i/∂W, W_t⟩ − 2σ²_i.
  Per past entry: p̄ (Cin·kh·kw), ∂σ²/∂W (|W|), two (C,) vectors. With k = 4 that is
  ≈ 3·|W| + 3·Cin·kh·kw floats per layer, against 9·|W| (past W, ∂μ/∂W, ∂ν/∂W) in the official
  code; per step one pass over the window's ∂σ²/∂W (3·|W|) and no other weight-sized work.
- The pooled variance is mean_i v_i + mean_i (μ_i − μ̄)² with v_i = max(σ²_i,comp, 0): the
  paper's clamp, never NaN (the official code drops entries instead and can divide by zero).
- eps is inside the square root, as BatchNorm (the official default adds it outside).

Our choices where the paper/official code leave room (documented, testable):
- Burn-in counts optimizer steps (``after_optimizer_step``, called by ``normsurgeon.after_step``),
  not forward calls: ``burnin`` steps of exact BatchNorm, then the window. Entries are collected
  from then on (the window fills over the next k − 1 iterations).
- An entry is stored for every gradient-enabled training forward (other no-grad training
  forwards use the window but do not add to it).
- Running statistics follow BatchNorm exactly (EMA of the *current* batch's μ and unbiased σ²,
  as the official code), so eval is BatchNorm.
- Recalibration (``normsurgeon.recalibrate_bn``, through ``begin_recalibration`` /
  ``end_recalibration``) normalizes as plain BatchNorm: the window is not updated without
  gradients, so pooling every recalibration batch with the same k − 1 training batches would
  shift all of them by those batches' offset from the population, layer after layer (measured:
  Lite0 fine-tuned with cbn at batch 32 on the photo task, 66% test accuracy as trained, 31% after
  a recalibration through the window, 66% after one as BatchNorm). ``torch.optim.swa_utils.update_bn``
  knows no such protocol and recalibrates through the window: use ``recalibrate_bn``.
- All state (window, step counter, ring position) is in registered buffers: checkpointed,
  moved by ``.to()``, copied by ``deepcopy``.
- Under ``torch.compile`` the state is shape- and branch-stable: the pool size n comes from the
  ``past_valid`` buffer, and the ring position is read from the ``past_head`` buffer (entries are
  written with ``index_copy_``) instead of the Python mirror that eager mode uses to write the
  derivatives straight into their slot. So the window fills without recompiling; the end of the
  burn-in (a change of branch) recompiles once.

The layer reads its conv's input through a forward hook on the conv (``attach``), and checks
that its own input is that conv's output from the same forward; a weak reference keeps the conv
from owning the norm (no duplicate state_dict keys; ``deepcopy`` and pickling re-bind it).
"""
from __future__ import annotations

import contextlib
import copy
import math
import weakref

import torch
from torch import nn

from ._conv_statistics import conv_statistics
from ._stateful import StepHookClient
from .running_statistics import require_two_values, running_factor, update_running
from .batch_norm import BatchNorm


def _autocast_off(device_type: str):
    """Autocast turned off on ``device_type`` while it is on there (else no change): the window's
    statistics, dot products and derivatives stay in the precision of the layer's buffers."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _ConvTap:
    """Forward hook on the producing conv: hands (conv, input, output) to its CBN layer.

    Holds the layer weakly (a norm replaced by a later conversion leaves a no-op hook behind);
    ``deepcopy`` re-binds to the copied layer and pickling stores the layer itself.
    """

    def __init__(self, layer: "CrossIterationBatchNorm | None"):
        self._ref = weakref.ref(layer) if layer is not None else None

    def layer(self):
        return self._ref() if self._ref is not None else None

    def __call__(self, conv: nn.Module, args, output) -> None:
        layer = self.layer()
        if layer is not None and args:
            layer._tap = (conv, args[0], output)

    def __deepcopy__(self, memo):
        layer = self.layer()
        return _ConvTap(copy.deepcopy(layer, memo) if layer is not None else None)

    def __reduce__(self):
        return (_ConvTap, (self.layer(),))


class CrossIterationBatchNorm(StepHookClient, BatchNorm):
    """CBN after a Conv2d: x (N, C, H, W) is the output of the conv with weight ``weight_shape``
    = (C, Cin/G, kh, kw) and ``groups`` = G. Equations and choices in the module docstring."""

    def __init__(self, num_features: int, weight_shape: tuple[int, int, int, int], groups: int = 1,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, window: int = 4, burnin: int = 0,
                 rho: float = 1.0, act: nn.Module | None = None, drop: nn.Module | None = None,
                 statistics_pending: bool = False):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r}: the number of iterations pooled (current + past), an int >= 1")
        if not isinstance(burnin, int) or burnin < 0:
            raise ValueError(f"burnin={burnin!r}: a number of optimizer steps, an int >= 0")
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho={rho!r}: the compensation coefficient, a finite number >= 0 "
                             f"(1 = the paper's compensation, 0 = plain averaging)")
        weight_shape = tuple(int(s) for s in weight_shape)
        if len(weight_shape) != 4 or weight_shape[0] != num_features or num_features % groups:
            raise ValueError(f"weight_shape={weight_shape} with groups={groups} is not the weight of a "
                             f"Conv2d with {num_features} output channels")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, act=act, drop=drop,
                         statistics_pending=statistics_pending)
        self.window, self.burnin, self.rho = window, burnin, float(rho)
        self.groups, self.weight_shape = groups, weight_shape
        self.conv_name: str | None = None
        past, (c, cin_g, kh, kw) = window - 1, weight_shape
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("past_head", torch.zeros(1, dtype=torch.long))  # next slot to write
        self.register_buffer("past_valid", torch.zeros(past))
        for name in ("past_mean", "past_var"):
            self.register_buffer(name, torch.zeros(past, c))
        # the derivatives are stored flat, (k − 1, G or C, Cin/G·kh·kw): 3-d buffers are left alone
        # by model.to(memory_format=torch.channels_last), which rejects 5-d tensors
        self.register_buffer("past_mean_patch", torch.zeros(past, groups, cin_g * kh * kw))
        self.register_buffer("past_var_grad", torch.zeros(past, c, cin_g * kh * kw))
        self._steps = 0  # mirror of num_steps (read without a device sync)
        self._burning_in = burnin > 0  # self._steps < burnin, as a flag that changes once (compile guards)
        self._head: int | None = 0  # mirror of past_head; None after compiled pushes (read the buffer)
        self._tap = None
        self._recalibrating = False  # True between begin_ and end_recalibration: plain BatchNorm

    # -- wiring -----------------------------------------------------------------------------
    def attach(self, conv: nn.Conv2d, name: str | None = None) -> "CrossIterationBatchNorm":
        """Read ``conv``'s input on every call (a forward hook on ``conv``)."""
        if tuple(conv.weight.shape) != self.weight_shape or conv.groups != self.groups:
            raise ValueError(f"{self._where()} was built for a conv weight {self.weight_shape} with "
                             f"groups={self.groups}, got {tuple(conv.weight.shape)}, groups={conv.groups}")
        conv.register_forward_hook(_ConvTap(self))
        self.conv_name = name
        return self

    # -- step hook protocol -------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        """One optimizer step happened (called by ``normsurgeon.after_step``): counts the burn-in."""
        self._steps += 1
        self.num_steps.fill_(self._steps)
        self._burning_in = self._steps < self.burnin
        self._note_step()

    def _needs_step_hook(self) -> bool:
        return self.window > 1 and self._steps < self.burnin

    def _missing_hook_consequence(self) -> str:
        return ("Cross-Iteration BN counts its burn-in in optimizer steps: without the hook it stays "
                "plain BatchNorm.")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._steps, self._head = int(self.num_steps), int(self.past_head)
        self._burning_in = self._steps < self.burnin

    # -- recalibration protocol (normsurgeon.recalibrate_bn) ---------------------------------
    def begin_recalibration(self) -> None:
        """Until ``end_recalibration``, training forwards are BatchNorm's (module docstring): the
        running statistics accumulate as any BatchNorm's, the window is left as it is."""
        self._recalibrating = True

    def end_recalibration(self, completed: bool = True) -> None:
        """Back to the window. The running statistics are recalibrate_bn's to keep or restore."""
        self._recalibrating = False

    # -- statistics ---------------------------------------------------------------------------
    @torch.no_grad()
    def past_statistics(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        rho: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The window's past entries compensated to conv parameters (``weight``, ``bias``).

        Returns (mean, var, valid), each with k − 1 rows: μ_i + Δμ_i, max(σ²_i + ρ·∂σ²·ΔW −
        Δμ_i², 0) per channel (C,), and 1.0 for entries that hold data. ``rho`` overrides the
        layer's ρ (0: the stored, uncompensated statistics).
        """
        with _autocast_off(weight.device.type):
            mean, var = self._compensated(weight, bias, self.rho if rho is None else rho)
        return mean, var, self.past_valid.clone()

    def _compensated(self, weight: torch.Tensor, bias: torch.Tensor | None, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) of ``past_statistics``; new tensors."""
        if rho == 0 or self.window == 1:
            return self.past_mean.clone(), self.past_var.clone()
        past, c, g = self.window - 1, self.num_features, self.groups
        w = weight.detach().to(self.past_mean.dtype)
        # ⟨p̄_i, W_c⟩ for every entry i and channel c: one (C/G, L) @ (L, k−1) product per group
        dot_mean = torch.bmm(w.reshape(g, c // g, -1),
                             self.past_mean_patch.permute(1, 2, 0)).permute(2, 0, 1).reshape(past, c)
        dot_var = torch.einsum("cl,pcl->pc", w.reshape(c, -1), self.past_var_grad)
        if bias is not None:
            dot_mean += bias.detach().to(dot_mean.dtype)
        # module docstring: μ + ρΔμ with Δμ = ⟨p̄_i, W⟩ + b − μ_i, and σ² + ρ(⟨∂σ²_i/∂W, W⟩ − 2σ²_i) − (ρΔμ)²
        mean = torch.lerp(self.past_mean, dot_mean, rho)
        var = torch.lerp(self.past_var, dot_var.sub_(self.past_var), rho)
        return mean, var.sub_((mean - self.past_mean).square_()).clamp_min_(0)

    @torch.no_grad()
    def _push(self, conv: nn.Conv2d, conv_input: torch.Tensor, centered: torch.Tensor,
              mean: torch.Tensor, var: torch.Tensor) -> None:
        """Store the current batch's statistics and derivatives in the ring (``centered`` = conv
        output − ``mean``); the derivatives are written straight into their slot."""
        if torch.compiler.is_compiling():
            return self._push_indexed(conv, conv_input, centered, mean, var)
        slot = self._head if self._head is not None else int(self.past_head)
        out = (self.past_mean_patch[slot].view((self.groups,) + self.weight_shape[1:]),
               self.past_var_grad[slot].view(self.weight_shape))
        conv_statistics(conv, conv_input, centered, mean, var, centered=True, out=out)
        self.past_mean[slot].copy_(mean)
        self.past_var[slot].copy_(var)
        self.past_valid[slot] = 1.0
        self._head = (slot + 1) % (self.window - 1)
        self.past_head.fill_(self._head)

    @torch.no_grad()
    def _push_indexed(self, conv: nn.Conv2d, conv_input: torch.Tensor, centered: torch.Tensor,
                      mean: torch.Tensor, var: torch.Tensor) -> None:
        """``_push`` with the slot read from the ``past_head`` buffer (no Python int to guard on, so
        torch.compile does not recompile per slot); the derivatives go through one temporary.

        The small per-channel entries (``past_mean``, ``past_var``, ``past_valid``) are replaced by
        updated tensors rather than written in place: AOTAutograd may recompute cheap forward ops
        from a buffer inside the backward, after the forward has written that buffer in place (seen
        with torch 2.14: n = 1 + Σ valid recomputed from the updated ``past_valid`` gave wrong
        gradients while the window filled). The derivatives enter the forward only through matrix
        products, which are saved rather than recomputed, so they are written in place.
        """
        out = (self.past_mean_patch.new_empty((self.groups,) + self.weight_shape[1:]),
               self.past_var_grad.new_empty(self.weight_shape))
        conv_statistics(conv, conv_input, centered, mean, var, centered=True, out=out)
        head = self.past_head
        self.past_mean_patch.index_copy_(0, head, out[0].view(1, self.groups, -1))
        self.past_var_grad.index_copy_(0, head, out[1].view(1, self.num_features, -1))
        self.past_mean = self.past_mean.index_copy(0, head, mean.to(self.past_mean.dtype).unsqueeze(0))
        self.past_var = self.past_var.index_copy(0, head, var.to(self.past_var.dtype).unsqueeze(0))
        self.past_valid = self.past_valid.index_fill(0, head, 1.0)
        self.past_head.copy_((head + 1) % (self.window - 1))
        self._head = None  # the Python mirror is stale: the next eager push reads the buffer

    def state_bytes(self) -> int:
        """Bytes of cross-iteration state (the window and counters) held by this layer."""
        names = ("num_steps", "past_head", "past_valid", "past_mean", "past_var", "past_mean_patch",
                 "past_var_grad")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    # -- forward ------------------------------------------------------------------------------
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        tap, self._tap = self._tap, None
        if self.training:
            self._note_training_forward()
        if not self.training or self.window == 1 or self._burning_in or self._recalibrating:
            return super()._normalize(x)  # BatchNorm exactly
        with _autocast_off(x.device.type):
            return self._normalize_window(x, tap)

    def _normalize_window(self, x: torch.Tensor, tap) -> torch.Tensor:
        self._check_input_dim(x)
        if x.ndim != 4:
            raise ValueError(f"{self._where()} expects the (N, C, H, W) output of a Conv2d, got {tuple(x.shape)}")
        count = x.shape[0] * x.shape[2] * x.shape[3]
        require_two_values(self, x, count)
        conv = conv_input = None
        if tap is not None and tap[2] is x:
            conv, conv_input = tap[0], tap[1]
        elif x.device.type != "meta":  # (meta: shape checks of a layer alone)
            raise RuntimeError(
                f"{self._where()} needs the input of its conv{f' {self.conv_name!r}' if self.conv_name else ''} "
                f"to compensate statistics across iterations, but its input is not that conv's output "
                f"from this forward. Call it right after its conv, on the conv's output (as "
                f"normsurgeon.convert(model, to='cbn') wires it), or attach it with layer.attach(conv).")
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if conv is not None:
            past_mean, past_var = self._compensated(conv.weight, conv.bias, self.rho)
        else:
            past_mean, past_var = self.past_mean, self.past_var
        valid, weight, bias = self.past_valid, self.weight, self.bias
        if past_mean.dtype != work.dtype:
            past_mean, past_var, valid = past_mean.to(work.dtype), past_var.to(work.dtype), valid.to(work.dtype)
        if weight is not None and weight.dtype != work.dtype:
            weight, bias = weight.to(work.dtype), bias.to(work.dtype)
        push = conv is not None and torch.is_grad_enabled()
        n = valid.sum() + 1  # the current batch and the valid past entries, a tensor: no guard on it
        out, mean_t, var_t, centered = _WindowNorm.apply(work, weight, bias, past_mean, past_var, valid, n, self.eps)
        out = out.to(x.dtype)
        factor = running_factor(self, x)
        update_running(self, mean_t, var_t, count, factor)
        if push:
            self._push(conv, conv_input, centered, mean_t, var_t)
        return out

    def extra_repr(self) -> str:
        conv = f", conv={self.conv_name!r}" if self.conv_name else ""
        return super().extra_repr() + f", window={self.window}, burnin={self.burnin}, rho={self.rho}{conv}"


class _WindowNorm(torch.autograd.Function):
    """y = γ (x − μ̄)·s + β, s = (σ̄² + eps)^−½, with μ̄, σ̄² pooled over n = 1 + (valid past entries)
    (a 0-d tensor) from the current batch's μ_t, σ²_t and the constant past entries (module docstring); backward
    in closed form.

    Forward: μ_t, the centered batch c = x − μ_t, σ²_t = mean(c²) (plain reductions: on CPU
    ``torch.var_mean`` over (N, H, W) is 3–10× slower), then y by an eval-form BatchNorm of c with
    "running mean" μ̄ − μ_t. Backward: only μ_t and σ²_t depend on x, each with weight 1/n in the
    pool, so ∂L/∂x is BatchNorm's training backward with its two batch-statistics terms divided
    by n:
        ∂L/∂x = γs·[g − (1/(nM))·Σg − x̂·(1/(nM))·Σ(g·x̂)],   x̂ = (x − μ̄)·s,  M = N·H·W
              = (1/n)·BNtrain(g; mean μ̄, invstd s, weight γ) + (1 − 1/n)·γs·g,
    one ``native_batch_norm_backward`` (which also gives ∂L/∂γ = Σg·x̂ and ∂L/∂β = Σg) and one
    in-place addcmul. Returns (y, μ_t, σ²_t, c); the last three carry no gradient, and c is handed
    on to the derivatives (``conv_statistics``), which need exactly it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, past_mean, past_var, valid, n, eps):
        ctx.set_materialize_grads(False)  # μ_t, σ²_t and c get no gradient: no zero tensors for them
        mean_t = x.mean(dim=(0, 2, 3))
        centered = x - mean_t.view(1, -1, 1, 1)
        var_t = centered.square().mean(dim=(0, 2, 3))
        # pooled over the batch and the valid entries (valid: 0/1, n = 1 + their number):
        # μ̄ = (μ_t + Σ μ_i)/n,  σ̄² = (σ²_t + (μ_t − μ̄)² + Σ σ²_i + (μ_i − μ̄)²)/n
        # (masked sums over the k − 1 entries rather than addmv: the same on a device, and on meta
        # tensors, where convert checks the layer, addmv's shape rule is several times slower)
        valid = valid.unsqueeze(1)
        mean = (past_mean * valid).sum(0).add_(mean_t).div_(n)
        spread = (past_mean - mean).square_().add_(past_var)
        var = (spread * valid).sum(0).add_((mean_t - mean).square_()).add_(var_t).div_(n)
        shift = mean - mean_t  # c − shift = x − μ̄
        out = torch.batch_norm(centered, weight, bias, shift, var, False, 0.0, eps, False)
        # for the backward: BatchNorm's weight γ/n and the coefficient (1 − 1/n)·γs of g
        invstd = var.add(eps).rsqrt_()
        gamma = weight if weight is not None else torch.ones_like(var)
        ctx.save_for_backward(centered, gamma / n, shift, invstd, invstd * gamma * (1 - 1 / n))
        ctx.eps, ctx.has_weight, ctx.has_bias = eps, weight is not None, bias is not None
        ctx.mark_non_differentiable(mean_t, var_t, centered)
        return out, mean_t, var_t, centered

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var, _grad_centered):
        if grad is None:
            return (None,) * 8
        centered, bn_weight, shift, invstd, direct = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, centered, bn_weight, None, None, shift, invstd, True, ctx.eps,
            [True, ctx.has_weight and ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]])
        grad_x.addcmul_(grad, direct.view(1, -1, 1, 1))  # (zero while the window is empty, n = 1)
        return grad_x, grad_w, grad_b, None, None, None, None, None
