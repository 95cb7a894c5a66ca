"""Train-mode (batch-statistics) kernels of ``BatchGroupNorm`` and ``InstanceEnhancementBatchNorm``.

Both layers are an affine map per (sample, channel) once the batch statistics are known,

    y_{n,c,p} = K_{n,c} · x_{n,c,p} + L_{n,c},

so the forward is two native reductions plus one ``addcmul`` pass, and the backward one native
reduction (the eval-mode batch-norm backward, which returns Σ_p g·x̂ and Σ_p g) plus two
elementwise passes. Compared with "batch norm, then a separate affine", this saves one
full-size pass in the forward and two in the backward.

Statistics come from ``torch.native_group_norm`` per (sample, group) — a stable one-pass kernel,
much faster on CPU than ``torch.var_mean`` over non-trailing axes — and are pooled over the
batch with the law of total variance (every (n, group) cell holds the same number of values):

    μ = mean_n μ_n,     σ² = mean_n σ²_n + mean_n (μ_n − μ)²        (biased, as BatchNorm).

The backward is first-order only (``once_differentiable``): double backward raises.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_aten = torch.ops.aten


def group_moments(x3: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x3 (N, C, P) -> mean, biased variance per (sample, group of C/G channels): (N, G) each.

    ``native_group_norm`` returns rstd = 1/sqrt(max(σ², 0) + eps); with eps = 0 we get
    σ² = rstd⁻² back without the cancellation of subtracting eps (σ² = 0 gives rstd = inf,
    and inf⁻² = 0). Its normalized output is discarded.
    """
    n, c, p = x3.shape
    _, mean, rstd = torch.native_group_norm(x3, None, None, n, c, p, groups, 0.0)
    return mean, rstd.pow(-2)


def pool_over_batch(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) per-sample mean / biased variance -> (K,) batch mean / biased variance."""
    pooled_mean = mean.mean(0)
    return pooled_mean, var.mean(0) + (mean - pooled_mean).pow(2).mean(0)


def _sums_per_row(g3: torch.Tensor, x3: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """g3, x3 (B, K, P); mean, var (K,) -> Σ_{b,p} g·x̂ and Σ_{b,p} g, (K,) each, with
    x̂ = (x − mean) / sqrt(var + eps): the weight / bias gradients of an eval-mode batch norm,
    one fused native pass over g and x."""
    _, sum_g_xhat, sum_g = _aten.native_batch_norm_backward(
        g3, x3, None, mean, var, None, None, False, eps, [False, True, True])
    return sum_g_xhat, sum_g


class BatchGroupNormFunction(torch.autograd.Function):
    """BGN with batch statistics: (x (N, C, *), γ (C,) or None, β (C,) or None, G, eps) ->
    (y like x, μ_g (G,), σ²_g (G,) biased); the statistics are not differentiable outputs.

    Forward, with r_c = 1/sqrt(σ²_g + eps) and μ_c = μ_g for c in group g:
        K_c = γ_c r_c,   L_c = β_c − μ_c K_c,   y = K_c x + L_c.
    Backward (the batch-norm backward per group, M = N·(C/G)·P values per group, x̂ = r(x − μ)):
        T_c = Σ_{n,p} g x̂,  S_c = Σ_{n,p} g,  A_g = Σ_{c∈g} γ_c S_c / M,  B_g = Σ_{c∈g} γ_c T_c / M,
        dx = K_c g − r_c² B_g x + (r_c² B_g μ_c − r_c A_g),   dγ = T,   dβ = S.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1).contiguous()
        mean_g, var_g = pool_over_batch(*group_moments(x3, groups))
        mean_c, var_c = mean_g.repeat_interleave(c // groups), var_g.repeat_interleave(c // groups)
        r = torch.rsqrt(var_c + eps)
        k = r if weight is None else weight * r
        shift = -mean_c * k if bias is None else bias - mean_c * k
        # y must not be a view (in-place ops such as ReLU(inplace=True) follow): broadcast the
        # (C,) factors over x3 seen in x's shape rather than viewing the (N, C, P) result.
        view = (1, c) + (1,) * (x.ndim - 2)
        y = torch.addcmul(shift.view(view), x3.view(x.shape), k.view(view))
        ctx.save_for_backward(x3, weight, mean_c, var_c, r)
        ctx.groups, ctx.eps, ctx.has_bias = groups, eps, bias is not None
        ctx.mark_non_differentiable(mean_g, var_g)
        return y, mean_g, var_g

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x3, weight, mean_c, var_c, r = ctx.saved_tensors
        n, c, p = x3.shape
        groups = ctx.groups
        g3 = grad_y.reshape(n, c, p).contiguous()
        sum_g_xhat, sum_g = _sums_per_row(g3, x3, mean_c, var_c, ctx.eps)
        grad_x = None
        if ctx.needs_input_grad[0]:
            count = n * (c // groups) * p  # M: values per group statistic
            wt, ws = (sum_g_xhat, sum_g) if weight is None else (weight * sum_g_xhat, weight * sum_g)
            b = (wt.view(groups, -1).sum(1) / count).repeat_interleave(c // groups)
            a = (ws.view(groups, -1).sum(1) / count).repeat_interleave(c // groups)
            coef = -r * r * b
            const = r * r * b * mean_c - r * a
            k = r if weight is None else weight * r
            grad_x = torch.addcmul(const.view(1, c, 1), x3, coef.view(1, c, 1))
            grad_x.addcmul_(g3, k.view(1, c, 1))  # in place: no second full-size buffer
            grad_x = grad_x.view(grad_y.shape)
        grad_w = sum_g_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_g if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class InstanceEnhancementFunction(torch.autograd.Function):
    """IEBN with batch statistics: (x (N, C, *), γ, β, w, b (C,) each, eps) ->
    (y like x, μ_c (C,), σ²_c (C,) biased); the statistics are not differentiable outputs.

    Forward, with s_{n,c} = mean_p x (the context), a = sigmoid(w s + b), r_c = 1/sqrt(σ²_c + eps):
        K_{n,c} = γ_c a_{n,c} r_c,   L_{n,c} = β_c − μ_c K_{n,c},   y = K x + L.
    Backward (x̂ = r(x − μ), M = N·P values per channel):
        T_{n,c} = Σ_p g x̂,  S_{n,c} = Σ_p g,  A_c = Σ_n γ a S / M,  B_c = Σ_n γ a T / M,
        dz = γ T a(1 − a)  (gradient w.r.t. the gate's pre-activation),
        dx = K g − r² B x + (r² B μ − r A + w dz / P),
        dγ = Σ_n a T,  dβ = Σ_n S,  dw = Σ_n dz s,  db = Σ_n dz.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, att_weight, att_bias, eps: float):
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1).contiguous()
        context, var_nc = group_moments(x3, c)  # per (n, c): the context s is the spatial mean
        mean_c, var_c = pool_over_batch(context, var_nc)
        r = torch.rsqrt(var_c + eps)
        gate = torch.sigmoid(torch.addcmul(att_bias, context, att_weight))  # (N, C)
        k = weight * gate * r
        shift = bias - mean_c * k
        view = (n, c) + (1,) * (x.ndim - 2)  # y must not be a view: see BatchGroupNormFunction
        y = torch.addcmul(shift.view(view), x3.view(x.shape), k.view(view))
        ctx.save_for_backward(x3, weight, att_weight, context, gate, mean_c, var_c, r, k)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean_c, var_c)
        return y, mean_c, var_c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x3, weight, att_weight, context, gate, mean_c, var_c, r, k = ctx.saved_tensors
        n, c, p = x3.shape
        g3 = grad_y.reshape(n, c, p).contiguous()
        # Per-(n, c) sums: the (N, C, P) tensors viewed as one sample of N·C rows.
        sum_g_xhat, sum_g = _sums_per_row(g3.view(1, n * c, p), x3.view(1, n * c, p),
                                          mean_c.repeat(n), var_c.repeat(n), ctx.eps)
        sum_g_xhat, sum_g = sum_g_xhat.view(n, c), sum_g.view(n, c)
        dz = weight * sum_g_xhat * gate * (1 - gate)
        grad_x = None
        if ctx.needs_input_grad[0]:
            count = n * p  # M: values per channel statistic
            a = (weight * gate * sum_g).sum(0) / count
            b = (weight * gate * sum_g_xhat).sum(0) / count
            coef = (-r * r * b).expand(n, c)
            const = r * r * b * mean_c - r * a + dz * att_weight / p  # (N, C)
            grad_x = torch.addcmul(const.unsqueeze(2), x3, coef.unsqueeze(2))
            grad_x.addcmul_(g3, k.unsqueeze(2))  # in place: no second full-size buffer
            grad_x = grad_x.view(grad_y.shape)
        need = ctx.needs_input_grad
        return (grad_x,
                (gate * sum_g_xhat).sum(0) if need[1] else None,
                sum_g.sum(0) if need[2] else None,
                (dz * context).sum(0) if need[3] else None,
                dz.sum(0) if need[4] else None,
                None)
