"""What a normalization layer computes in eval mode, as a per-channel affine map (or why it is not one).

In eval mode a BatchNorm with running statistics μ, σ² computes, per channel c,

    y_c = γ_c (x_c − μ_c) / sqrt(σ²_c + eps) + β_c = s_c·x_c + t_c,
    s_c = γ_c / sqrt(σ²_c + eps),   t_c = β_c − μ_c·s_c,

an affine map of its input, which a linear layer next to it can absorb. Per layer type:

- ``bn``, ``cbn``, ``mbn`` and torch's / timm's BatchNorms: their running statistics (``mbn`` mirrors its
  pooled memory into them; ``cbn`` evaluates as BatchNorm). Without running statistics
  (``track_running_stats=False``) a BatchNorm normalizes with batch statistics in eval too: not affine.
- ``frozen_bn``, torchvision's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``: their fixed statistics.
- ``bgn``: each group's statistics (μ_g, σ²_g) for every channel of the group, with the per-channel γ, β.
- ``dsbn``: the statistics (and γ, β when per domain) of one chosen domain.
- ``iebn``: y = γ·a·(x − μ)/σ + β with the per-sample gate a = sigmoid(w·GAP(x) + b). Its BN part
  x' = s·x − s·μ (s = γ/σ) folds into the conv before it; the gate stays, rewritten on x':
  GAP(x) = GAP(x')/s + μ, so a = sigmoid(w'·GAP(x') + b') with w' = w/s, b' = b + w·μ, and
  y = x'·a + β (``InstanceGate``). Needs every γ_c ≠ 0 (else GAP(x) is lost in x').
- GroupNorm, LayerNorm, InstanceNorm, PositionalNorm and Proxy Norm normalize each sample by its own
  statistics: y is not an affine function of x, nothing folds.

A timm NormAct layer's ``drop`` and ``act`` (and ours) run after the affine map; they stay at the site
(``FoldedAct``). All numbers are float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import layers
from ..layers.domain_batch_norm import resolve_route
from ..surgery.graph.sites import find_sites
from ..surgery.sources import match_source
from .remnants import FoldedAct, InstanceGate

BATCH_INDEPENDENT = ("normalizes each sample with its own statistics (batch-independent): its output is "
                     "not an affine map of its input, so no linear layer can absorb it")


@dataclass
class EvalAffine:
    """A norm in eval mode: ``remainder(scale · x + shift)``, per channel.

    scale, shift: (C,) float64, along axis 1 (channels-first) or the last axis (``channels_last``).
    ``remainder``: the module left at the site after the affine part is folded away (fused drop/act,
    IEBN's gate), or None when nothing is left. Only a map without remainder can fold into the
    layer *after* it (the remainder would have to run between the two).
    """

    scale: torch.Tensor
    shift: torch.Tensor
    channels_last: bool = False
    remainder: nn.Module | None = None


def _from_statistics(mean, var, eps, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """s = γ / sqrt(σ² + eps), t = β − μ·s, in float64 (γ = 1, β = 0 when absent)."""
    scale = torch.rsqrt(var.detach().double() + eps)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -mean.detach().double() * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def _fused(module: nn.Module) -> FoldedAct | None:
    """The module's fused drop/act (timm NormAct layers, normsurgeon layers), or None if both absent."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    keep = [m for m in (drop, act) if isinstance(m, nn.Module) and type(m) is not nn.Identity]
    return FoldedAct(drop, act) if keep else None


def _frozen_types() -> tuple[type, ...]:
    import timm.layers as tl
    from torchvision.ops.misc import FrozenBatchNorm2d
    return (layers.FrozenBatchNorm, FrozenBatchNorm2d, tl.FrozenBatchNormAct2d)


def runs_batch_statistics_in_training(module: nn.Module) -> bool:
    """True for layers whose training-mode output depends on the batch (BatchNorm family, dsbn)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, layers.DomainSpecificBatchNorm))


def require_eval_norms(model: nn.Module, error: type[Exception], consequence: str, action: str) -> None:
    """Raise ``error`` when norm sites of ``model`` would normalize with batch statistics now (training
    mode): the message counts them, names the first five, then gives the ``consequence`` and the ``action``."""
    names = [s.name for s in find_sites(model) if runs_batch_statistics_in_training(s.module) and s.module.training]
    if names:
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise error(f"{len(names)} batch-dependent normalization layers are in training mode ({shown}): "
                    f"{consequence}. {action}")


def eval_affine(module: nn.Module, domain=None) -> EvalAffine | str:
    """The eval-mode affine map of a norm ``module`` (module docstring), or why it has none.

    ``domain``: the domain (name or index) a ``dsbn`` layer is evaluated for.
    """
    match = match_source(module)
    if match.unsupported:
        return match.unsupported
    if not match.is_site:
        return f"{type(module).__name__} is not a normalization layer"
    if runs_batch_statistics_in_training(module) and module.training:
        return "in training mode (normalizes with batch statistics)"
    channels_last = bool(getattr(module, "channels_last", False))
    if isinstance(module, layers.DomainSpecificBatchNorm):
        k = resolve_route(module.domains, domain, where=f"dsbn layer {module.site_name or ''}".strip())
        weight, bias = module.weight, module.bias
        if module.per_domain_affine:
            weight, bias = weight[k], bias[k]
        scale, shift = _from_statistics(module.running_mean[k], module.running_var[k], module.eps, weight, bias)
        return EvalAffine(scale, shift, channels_last, _fused(module))
    if isinstance(module, layers.InstanceEnhancementBatchNorm):
        return _instance_enhancement(module, channels_last)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            return "has no running statistics (track_running_stats=False): it uses batch statistics in eval too"
        mean, var = module.running_mean, module.running_var
        if isinstance(module, layers.BatchGroupNorm):  # (G,) group statistics → (C,)
            per_group = module.num_channels // module.num_groups
            mean, var = mean.repeat_interleave(per_group), var.repeat_interleave(per_group)
        scale, shift = _from_statistics(mean, var, module.eps, module.weight, module.bias)
        return EvalAffine(scale, shift, channels_last, _fused(module))
    if isinstance(module, _frozen_types()):
        scale, shift = _from_statistics(module.running_mean, module.running_var, module.eps,
                                        module.weight, module.bias)
        return EvalAffine(scale, shift, channels_last, _fused(module))
    if getattr(module, "track_running_stats", False) and getattr(module, "running_mean", None) is not None:
        return (f"a {type(module).__name__} with running statistics is an affine map in eval, but fold "
                f"does not support it")
    return BATCH_INDEPENDENT


def _instance_enhancement(module: layers.InstanceEnhancementBatchNorm, channels_last: bool) -> EvalAffine | str:
    """IEBN: the BN part s·x − s·μ folds; the gate stays as ``InstanceGate`` (module docstring)."""
    if channels_last:
        return "an IEBN in channels-last layout is not supported by fold"
    if module.running_mean is None or module.running_var is None:
        return "has no running statistics (track_running_stats=False): it uses batch statistics in eval too"
    mean = module.running_mean.detach().double()
    scale, _ = _from_statistics(mean, module.running_var, module.eps, module.weight, None)
    if bool((scale == 0).any()):
        return ("γ = 0 in some channel: the gate's input GAP(x) cannot be recovered from the folded "
                "conv's output there")
    w = module.attention_weight.detach().double()
    gate = InstanceGate(w / scale, module.attention_bias.detach().double() + w * mean,
                        module.bias.detach().double(), drop=getattr(module, "drop", None),
                        act=getattr(module, "act", None), like=module.weight)
    return EvalAffine(scale, -mean * scale, False, gate)
