"""Which modules are normalization sites, and what each one holds.

A registry maps a norm class to a *reader* that turns a module into a ``SourceNorm``: its
kind of statistics, layout, eps, affine, running statistics and fused act/drop. Matching is
explicit: a class is a source if it, or an ancestor whose ``forward`` it does not override,
is registered. A subclass of a registered norm with its own ``forward`` is reported as
unsupported, never silently converted (its forward may compute something else) nor skipped.

Kinds (what the source normalizes over, x as (N, C, *positions)):
  batch         per channel over (N, positions), batch statistics + running estimates
  frozen_batch  per channel, fixed statistics
  group         per sample and channel group over (C/G, positions)
  positional    per sample and position over C (transformer LayerNorm, LayerNorm2d)
  instance      per sample and channel over positions
  rms           per sample and position over C without centring (RMSNorm: torch ``nn.RMSNorm``,
                timm ``RmsNorm``/``RmsNorm2d``): y = γ·x / sqrt(mean_C x² + eps). Transfer rule: γ
                copied, β (which the source lacks) starts at 0; never function-preserving, since
                every target centres (the same function only where the mean over C is 0).

Known norms without a transfer rule are sites reported as unsupported with the reason
(``UNSUPPORTED``): timm's FilterResponseNorm (FRN + TLU) and the EvoNorm family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import layers


@dataclass
class SourceNorm:
    """What a source norm computes and holds (tensors are the module's own, not copies)."""

    kind: str
    num_channels: int
    channels_last: bool
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    num_batches_tracked: torch.Tensor | None = None
    momentum: float | None = 0.1
    track_running_stats: bool = False
    num_groups: int | None = None
    act: nn.Module | None = None
    drop: nn.Module | None = None
    note: str | None = None

    @property
    def affine(self) -> bool:
        return self.weight is not None

    @property
    def has_statistics(self) -> bool:
        return self.running_mean is not None and self.running_var is not None


class UnsupportedSource(ValueError):
    """A registered norm class whose configuration cannot be converted (reason in the message)."""


def _fused(module: nn.Module) -> dict:
    act, drop = getattr(module, "act", None), getattr(module, "drop", None)
    keep = lambda m: m if isinstance(m, nn.Module) and not isinstance(m, nn.Identity) else None
    return {"act": keep(act), "drop": keep(drop)}


def read_batch_norm(m: nn.Module) -> SourceNorm:
    return SourceNorm(
        "batch", m.num_features, getattr(m, "channels_last", False), m.eps, m.weight, m.bias,
        m.running_mean, m.running_var, m.num_batches_tracked, m.momentum, m.track_running_stats,
        **_fused(m))


def read_frozen_batch_norm(m: nn.Module) -> SourceNorm:
    return SourceNorm(
        "frozen_batch", m.weight.numel(), getattr(m, "channels_last", False), getattr(m, "eps", 0.0),
        m.weight, m.bias, m.running_mean, m.running_var, **_fused(m))


def read_group_norm(m: nn.Module) -> SourceNorm:
    return SourceNorm(
        "group", m.num_channels, getattr(m, "channels_last", False), m.eps, m.weight, m.bias,
        num_groups=m.num_groups, **_fused(m))


def read_instance_norm(m: nn.Module) -> SourceNorm:
    return SourceNorm(
        "instance", m.num_features if hasattr(m, "num_features") else m.num_channels,
        getattr(m, "channels_last", False), m.eps, m.weight, m.bias,
        getattr(m, "running_mean", None), getattr(m, "running_var", None), **_fused(m))


def _positional(m: nn.Module, channels_last: bool, note: str | None = None) -> SourceNorm:
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        raise UnsupportedSource(
            f"LayerNorm over {len(shape)} trailing axes {shape}: only a LayerNorm over the channel "
            f"axis (one size) has per-channel parameters that carry over")
    return SourceNorm("positional", shape[0], channels_last, m.eps, m.weight, m.bias,
                      note=note, **_fused(m))


def _rms(m: nn.Module, channels_last: bool) -> SourceNorm:
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        raise UnsupportedSource(f"RMSNorm over {len(shape)} trailing axes {shape}: only one over the channel "
                                f"axis has per-channel parameters that carry over")
    eps = m.eps if m.eps is not None else torch.finfo(torch.float32).eps  # torch's default: the dtype's eps
    return SourceNorm("rms", shape[0], channels_last, eps, m.weight, None,
                      note="RMS norm (no centring): γ copied, β starts at 0; the target centres over its "
                           "statistics, so the swap is not function-preserving", **_fused(m))


def read_rms_norm(m: nn.Module) -> SourceNorm:
    """RMSNorm over C on channels-last input (N, *, C): torch ``nn.RMSNorm(C)``, timm ``RmsNorm``."""
    return _rms(m, True)


def read_rms_norm_2d(m: nn.Module) -> SourceNorm:
    """RMSNorm over C on channels-first input (N, C, H, W): timm ``RmsNorm2d``."""
    return _rms(m, False)


def read_layer_norm(m: nn.Module) -> SourceNorm:
    """``nn.LayerNorm(C)`` on channels-last input (N, *, C)."""
    return _positional(m, getattr(m, "channels_last", True))


def read_layer_norm_2d(m: nn.Module) -> SourceNorm:
    """LayerNorm over C on channels-first input (N, C, H, W), e.g. timm ``LayerNorm2d``."""
    return _positional(m, False)


def _fp32(reader: Callable[[nn.Module], SourceNorm]) -> Callable[[nn.Module], SourceNorm]:
    def read(m: nn.Module) -> SourceNorm:
        source = reader(m)
        fp32 = "the source computed in float32; the target computes in the input dtype"
        source.note = f"{source.note}; {fp32}" if source.note else fp32
        return source
    return read


def read_proxy_norm(m: nn.Module) -> SourceNorm:
    """PN-Act layer: GN/LN with its γ, β and φ; the proxy parameters have no counterpart."""
    return SourceNorm("group", m.num_channels, m.channels_last, m.eps, m.weight, m.bias,
                      num_groups=m.num_groups, act=m.act, drop=_fused(m)["drop"],
                      note="the proxy normalization after φ (γ̃, β̃) is dropped")


def read_batch_group_norm(m: nn.Module) -> SourceNorm:
    """BGN: group running statistics repeated over each group's channels (exact in eval)."""
    per_group = m.num_channels // m.num_groups
    stats = {}
    if m.running_mean is not None:
        stats = {"running_mean": m.running_mean.repeat_interleave(per_group),
                 "running_var": m.running_var.repeat_interleave(per_group)}
    return SourceNorm("batch", m.num_channels, m.channels_last, m.eps, m.weight, m.bias,
                      num_batches_tracked=m.num_batches_tracked, momentum=m.momentum,
                      track_running_stats=m.track_running_stats, **stats, **_fused(m))


def read_instance_enhancement(m: nn.Module) -> SourceNorm:
    """IEBN: a BatchNorm whose γ is the gated one at w = 0 (the instance gate is dropped)."""
    source = read_batch_norm(m)
    source.weight = m.weight.detach() * torch.sigmoid(m.attention_bias.detach())
    source.note = "the instance gate sigmoid(w·GAP(x) + b) is dropped (γ·sigmoid(b) kept; exact when w = 0)"
    return source


def read_domain_batch_norm(m: nn.Module) -> SourceNorm:
    """DSBN: a BatchNorm with the domains pooled, each with weight 1/K: the mixture statistics
    μ = mean_k μ_k, σ² = mean_k(σ²_k + μ_k²) − μ², γ, β averaged when per domain (exact for K = 1)."""
    mean = m.running_mean.double().mean(0)
    var = (m.running_var.double() + m.running_mean.double() ** 2).mean(0) - mean ** 2
    weight, bias = m.weight, m.bias
    if m.per_domain_affine:
        weight, bias = weight.detach().mean(0), bias.detach().mean(0)
    note = None if m.num_domains == 1 else (
        f"the {m.num_domains} domains' statistics are pooled with equal weights (mixture mean and variance)"
        + ("; per-domain γ, β averaged" if m.per_domain_affine else ""))
    return SourceNorm("batch", m.num_features, m.channels_last, m.eps, weight, bias,
                      mean.to(m.running_mean.dtype), var.clamp_min(0).to(m.running_var.dtype),
                      m.num_batches_tracked.sum(), m.momentum, True, note=note, **_fused(m))


Reader = Callable[[nn.Module], SourceNorm]
_READERS: dict[type, Reader] = {}


def register_source(cls: type, like: type | None = None, reader: Reader | None = None) -> type:
    """Declare ``cls`` a normalization source.

    ``like=nn.BatchNorm2d`` says ``cls`` computes exactly what ``like`` computes (its own
    forward is trusted to be equivalent); ``reader`` gives full control instead.
    """
    if (like is None) == (reader is None):
        raise TypeError("register_source needs exactly one of like= (a registered norm class) or reader=")
    if like is not None:
        reader = _READERS.get(like)
        if reader is None:
            raise ValueError(f"like={like!r} is not a registered source; registered: "
                             f"{sorted(c.__name__ for c in _READERS)}")
    _READERS[cls] = reader
    return cls


def _register_builtin() -> None:
    bn = nn.modules.batchnorm
    for cls in (bn._BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                layers.BatchNorm, layers.CrossIterationBatchNorm, layers.MemorizedBatchNorm):
        _READERS[cls] = read_batch_norm
    for cls in (nn.GroupNorm, layers.GroupNorm, layers.GroupNorm1):
        _READERS[cls] = read_group_norm
    for cls in (nn.modules.instancenorm._InstanceNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                nn.InstanceNorm3d, layers.InstanceNorm):
        _READERS[cls] = read_instance_norm
    _READERS[nn.LayerNorm] = read_layer_norm
    _READERS[layers.PositionalNorm] = read_layer_norm
    _READERS[layers.FrozenBatchNorm] = read_frozen_batch_norm
    _READERS[layers.ProxyNormAct] = read_proxy_norm
    _READERS[layers.BatchGroupNorm] = read_batch_group_norm
    _READERS[layers.InstanceEnhancementBatchNorm] = read_instance_enhancement
    _READERS[layers.DomainSpecificBatchNorm] = read_domain_batch_norm

    from torchvision.models.convnext import LayerNorm2d as TvLayerNorm2d
    from torchvision.ops.misc import FrozenBatchNorm2d
    _READERS[FrozenBatchNorm2d] = read_frozen_batch_norm
    _READERS[TvLayerNorm2d] = read_layer_norm_2d

    import timm.layers as tl
    for cls in (tl.BatchNormAct2d, tl.SyncBatchNormAct):
        _READERS[cls] = read_batch_norm
    _READERS[tl.FrozenBatchNormAct2d] = read_frozen_batch_norm
    for cls in (tl.GroupNorm, tl.GroupNorm1, tl.GroupNormAct, tl.GroupNorm1Act):
        _READERS[cls] = read_group_norm
    for cls in (tl.LayerNorm, tl.LayerNormAct):
        _READERS[cls] = read_layer_norm
    for cls in (tl.LayerNormFp32, tl.LayerNormActFp32):
        _READERS[cls] = _fp32(read_layer_norm)
    for cls in (tl.LayerNorm2d, tl.LayerNormAct2d):
        _READERS[cls] = read_layer_norm_2d
    for cls in (tl.LayerNorm2dFp32, tl.LayerNormAct2dFp32):
        _READERS[cls] = _fp32(read_layer_norm_2d)
    rms = {(nn.RMSNorm, tl.RmsNorm, tl.RmsNormAct): read_rms_norm,
           (tl.RmsNormFp32, tl.RmsNormActFp32): _fp32(read_rms_norm),
           (tl.RmsNorm2d, tl.RmsNormAct2d): read_rms_norm_2d,
           (tl.RmsNorm2dFp32, tl.RmsNormAct2dFp32): _fp32(read_rms_norm_2d)}
    for classes, reader in rms.items():
        _READERS.update(dict.fromkeys(classes, reader))
    frn = ("Filter Response Normalization: x / sqrt(mean over positions of x² + eps) per sample and channel, "
           "then a learned threshold max(y, τ) (TLU); no target reproduces τ and there is no mean to fold, "
           "so no transfer rule is documented. Left as it is")
    evo = ("EvoNorm: {what}; its learned gate v has no counterpart in any target and no transfer rule is "
           "documented. Left as it is")
    UNSUPPORTED.update({tl.FilterResponseNormAct2d: frn, tl.FilterResponseNormTlu2d: frn})
    for name in ("EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2"):
        UNSUPPORTED[getattr(tl, name)] = evo.format(what="x·sigmoid(v·x) (or x) over a batch-and-instance "
                                                         "standard deviation, with running variance")
    for name in ("EvoNorm2dS0", "EvoNorm2dS0a", "EvoNorm2dS1", "EvoNorm2dS1a", "EvoNorm2dS2", "EvoNorm2dS2a"):
        UNSUPPORTED[getattr(tl, name)] = evo.format(what="x·sigmoid(v·x) over a per-sample group standard "
                                                         "deviation, no centring of the numerator")


UNSUPPORTED: dict[type, str] = {}  # known norm classes without a transfer rule -> why

_register_builtin()


@dataclass
class Match:
    """Outcome of looking a module up: a reader, or the reason it is unsupported, or neither."""

    reader: Reader | None = None
    unsupported: str | None = None
    note: str | None = None

    @property
    def is_site(self) -> bool:
        return self.reader is not None or self.unsupported is not None


_NORM_NAME = re.compile(r"Norm")


def match_source(module: nn.Module) -> Match:
    """Classify ``module``: a registered source, an unsupported norm, or not a norm at all."""
    cls = type(module)
    if cls in _READERS:
        return Match(_READERS[cls])
    if cls in UNSUPPORTED:
        return Match(unsupported=UNSUPPORTED[cls])
    for base in cls.__mro__[1:]:
        if base in _READERS:
            if cls.forward is base.forward:
                return Match(_READERS[base], note=f"{cls.__name__} read as {base.__name__} "
                                                  f"(it does not override forward)")
            return Match(unsupported=(
                f"unknown subclass {cls.__name__} of {base.__name__} with its own forward; not "
                f"converted. If it computes a plain {base.__name__}, call "
                f"normsurgeon.register_source({cls.__name__}, like={base.__name__})"))
    children = [c for name, c in module.named_children() if name not in ("act", "drop")]
    if _NORM_NAME.search(cls.__name__) and not children:
        return Match(unsupported=f"{cls.__name__} is a normalization layer normsurgeon does not "
                                 f"know how to read (not a registered source); left as is")
    return Match()


def registered_source_types() -> tuple[type, ...]:
    return tuple(_READERS)
