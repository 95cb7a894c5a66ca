"""Per-sample gradients of normsurgeon's batch-independent layers, for Opacus (DP-SGD).

Importing this module registers one grad sampler per layer class with Opacus's
``register_grad_sampler`` (used by its 'hooks' and 'ghost' modes; Opacus dispatches on the
exact type, so ``nn.GroupNorm``'s sampler never reaches our subclass). Opacus calls a sampler
with the layer's input x = ``activations[0]`` and g = ∂L/∂out = ``backprops`` (batch first,
already scaled for the loss reduction), and takes back, for each trainable parameter p, the
per-sample gradients ∂L_n/∂p as an (N, *p.shape) tensor.

Every layer but PN-Act computes out = act(drop(y)), y_c = γ_c·x̂_c + β_c, so with
gy = ∂L/∂y (g pulled back through the elementwise act, one vjp) and p the positions:
    ∂L_n/∂γ_c = Σ_p gy_{n,c,p}·x̂_{n,c,p},    ∂L_n/∂β_c = Σ_p gy_{n,c,p},
where x̂ (no affine) is, per layer:
    GroupNorm, LayerNorm (G = 1), InstanceNorm (G = C):  group statistics over (C/G, positions)
    PositionalNorm:   statistics over C at each position
    FrozenBatchNorm:  (x − running_mean)/sqrt(running_var + eps), constants
PN-Act: see ``compute_proxy_norm_act_grad_sample``. A ``drop`` fused into a layer is random in
training and cannot be replayed from (x, g): such a layer is refused, naming it.
"""
from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F

from .. import layers


def _channels_first(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(N, C, *) from the layer's layout ((N, *, C) when ``channels_last``)."""
    return t.movedim(-1, 1) if layer.channels_last else t


def _in_layout(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1) if layer.channels_last else t


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *) → (N, C): the sum over positions (N may be 0: Poisson sampling's empty batches)."""
    return t.sum(tuple(range(2, t.ndim))) if t.ndim > 2 else t


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def _refuse_drop(layer: nn.Module) -> None:
    if type(layer.drop) is not nn.Identity:
        raise NotImplementedError(
            f"{layer._where()} applies a fused {type(layer.drop).__name__} before its activation: its "
            f"random mask cannot be replayed to compute per-sample gradients. Replace it "
            f"(layer.drop = nn.Identity()) or exclude this layer from DP training.")


def _pull_back(layer: nn.Module, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """∂L/∂y from g = ∂L/∂act(y), both in the layer's layout (act is elementwise). ``forward``
    is called, not the module: a trainable act (PReLU) has Opacus's hooks of its own, which must
    not see this replay."""
    if type(layer.act) is nn.Identity:
        return g
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        out = layer.act.forward(y.clone())  # clone: an in-place act must not overwrite the leaf
    return torch.autograd.grad(out, y, g)[0]


def _affine_grad_sample(layer: nn.Module, x_hat: torch.Tensor, g: torch.Tensor) -> dict:
    """Per-sample ∂L/∂γ, ∂L/∂β from x̂ (N, C, *) and g (the layer's layout)."""
    _refuse_drop(layer)
    weight, bias = layer.weight, layer.bias
    y = x_hat * _channel_view(weight.detach(), x_hat.ndim)
    if bias is not None:
        y = y + _channel_view(bias.detach(), x_hat.ndim)
    gy = _channels_first(layer, _pull_back(layer, _in_layout(layer, y), g))
    found = {}
    if weight.requires_grad:
        found[weight] = _per_channel(gy * x_hat).to(weight.dtype)
    if bias is not None and bias.requires_grad:
        found[bias] = _per_channel(gy).to(bias.dtype)
    return found


@register_grad_sampler([layers.GroupNorm, layers.GroupNorm1])
def compute_group_norm_grad_sample(layer, activations, backprops) -> dict:
    x = _channels_first(layer, activations[0])
    return _affine_grad_sample(layer, F.group_norm(x, layer.num_groups, eps=layer.eps), backprops)


@register_grad_sampler(layers.InstanceNorm)
def compute_instance_norm_grad_sample(layer, activations, backprops) -> dict:
    x = _channels_first(layer, activations[0])
    return _affine_grad_sample(layer, F.group_norm(x, layer.num_channels, eps=layer.eps), backprops)


@register_grad_sampler(layers.PositionalNorm)
def compute_positional_norm_grad_sample(layer, activations, backprops) -> dict:
    x = _channels_first(layer, activations[0])
    x_hat = F.layer_norm(x.movedim(1, -1), layer.normalized_shape, eps=layer.eps).movedim(-1, 1)
    return _affine_grad_sample(layer, x_hat, backprops)


@register_grad_sampler(layers.FrozenBatchNorm)
def compute_frozen_batch_norm_grad_sample(layer, activations, backprops) -> dict:
    x = _channels_first(layer, activations[0])
    mean = _channel_view(layer.running_mean.detach(), x.ndim)
    inv_std = _channel_view(torch.rsqrt(layer.running_var.detach() + layer.eps), x.ndim)
    return _affine_grad_sample(layer, (x - mean) * inv_std, backprops)


@register_grad_sampler(layers.ProxyNormAct)
def compute_proxy_norm_act_grad_sample(layer, activations, backprops) -> dict:
    r"""Exact per-sample gradients of PN-Act, whose proxy moments depend on parameters only.

    Per channel c, θ_c = (γ_c, β_c, γ̃_c, β̃_c); ŷ = GroupNorm(x) without affine; z = γ_c·ŷ + β_c;
        out_{n,c,p} = (φ(z_{n,c,p}) − m_c)·s_c,      (m_c, s_c) = M(θ_c)
    with M the proxy moments (mean and 1/sqrt(var + ε) of φ on the grid): functions of
    channel c's four parameters, the same for every sample. With g = ∂L/∂out, sample n's
    loss depends on θ_c through its own z_{n,c,·} and through (m_c, s_c):
        ∂L_n/∂m_c = −s_c·A_{n,c},   A_{n,c} = Σ_p g_{n,c,p}
        ∂L_n/∂s_c =  B_{n,c},       B_{n,c} = Σ_p g_{n,c,p}·(φ(z_{n,c,p}) − m_c)
    and, with w = s_c·φ'(z)·g (g·s pulled back through φ),
        ∂L_n/∂θ_c = D_{n,c}(θ) − s_c·A_{n,c}·∂m_c/∂θ_c + B_{n,c}·∂s_c/∂θ_c,
        D(γ) = Σ_p w·ŷ,  D(β) = Σ_p w,  D(γ̃) = D(β̃) = 0.
    Since m_c, s_c depend on θ_c only, ∂m_c/∂θ_c and ∂s_c/∂θ_c (the Jacobians' diagonals) are
    the gradients of Σ_c m_c and Σ_c s_c: two backward passes through the C×n grid, shared by
    the whole batch. Computed in the moments' precision (≥ float32), returned in the
    parameters' dtype. An activation with trainable parameters (PReLU) is refused: Opacus would
    hook it as a child of this layer, and it is also applied to the grid.
    """
    _refuse_drop(layer)
    if any(p.requires_grad for p in layer.act.parameters()):
        raise NotImplementedError(
            f"{layer._where()}: its activation {type(layer.act).__name__} has trainable parameters, "
            f"which get no exact per-sample gradient through the proxy grid. Freeze them "
            f"(layer.act.requires_grad_(False)) or convert this site to 'gn'/'ln'.")
    params = [layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias]
    trainable = [p for p in params if p.requires_grad]
    with torch.enable_grad():  # Opacus calls samplers during backward, where grad mode is off
        mean, scale = layer.proxy_moments()
        mean_sum, scale_sum = mean.sum(), scale.sum()
    dmean = torch.autograd.grad(mean_sum, trainable, retain_graph=True)
    dscale = torch.autograd.grad(scale_sum, trainable)
    mean, scale = mean.detach(), scale.detach()

    x = _channels_first(layer, activations[0]).to(mean.dtype)
    g = _channels_first(layer, backprops).to(mean.dtype)
    y_hat = F.group_norm(x, layer.num_groups, eps=layer.eps)
    z = _channel_view(layer.weight.detach().to(mean.dtype), x.ndim) * y_hat \
        + _channel_view(layer.bias.detach().to(mean.dtype), x.ndim)
    with torch.enable_grad():
        z = z.requires_grad_(True)
        a = layer.act(z.clone())
    (w,) = torch.autograd.grad(a, z, g * _channel_view(scale, x.ndim))
    coef_mean = -scale * _per_channel(g)                                     # −s_c·A_{n,c}
    coef_scale = _per_channel(g * (a.detach() - _channel_view(mean, x.ndim)))  # B_{n,c}
    direct = {id(layer.weight): _per_channel(w * y_hat), id(layer.bias): _per_channel(w)}
    found = {}
    for p, dm, ds in zip(trainable, dmean, dscale):
        per_sample = coef_mean * dm + coef_scale * ds
        if id(p) in direct:
            per_sample = per_sample + direct[id(p)]
        found[p] = per_sample.to(p.dtype)
    return found
