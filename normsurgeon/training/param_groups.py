"""Optimizer parameter groups with the weight-decay rules normalization layers need.

Rule: weight decay applies to weight matrices and kernels (conv, linear, embeddings with
ndim ≥ 2) and, among normalization parameters, only to Proxy Norm's γ̃, β̃ (``proxy_weight``,
``proxy_bias``: the Proxy Normalization paper's rule, which keeps the proxy close to the
normal distribution). Biases, every norm affine (including PN-Act's γ, β) and everything the
model lists in ``no_weight_decay()`` (timm: position embeddings, class tokens) get none.
"""
from __future__ import annotations

from torch import nn

from ..layers import ProxyNormAct

PROXY_PARAMETERS = ("proxy_weight", "proxy_bias")


def param_groups(model: nn.Module, weight_decay: float, **group_options) -> list[dict]:
    """Two groups for ``torch.optim``: {"name": "decay", ...} and {"name": "no_decay", ...}.

    Each group also carries ``param_names`` (for inspection; optimizers ignore extra keys).
    ``group_options`` (e.g. ``lr=``) are copied into both groups.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    proxy_names = {f"{name}.{p}" if name else p for name, m in model.named_modules()
                   if isinstance(m, ProxyNormAct) for p in PROXY_PARAMETERS}
    decay, no_decay = ([], []), ([], [])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in proxy_names:
            wants_decay = True
        else:
            wants_decay = param.ndim >= 2 and name not in skip and name.split(".")[-1] not in skip
        group = decay if wants_decay else no_decay
        group[0].append(param)
        group[1].append(name)
    return [dict(group_options, name="decay", params=decay[0], param_names=decay[1], weight_decay=weight_decay),
            dict(group_options, name="no_decay", params=no_decay[0], param_names=no_decay[1], weight_decay=0.0)]
