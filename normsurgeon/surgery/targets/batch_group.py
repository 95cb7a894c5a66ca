"""bgn and iebn: the two drop-in batch-statistics seed variants as conversion targets.

bgn (Batch Group Norm): ``num_groups=G`` (G | C; G = C is BatchNorm), ``group_size=C/G``, or ``"auto"`` with
``batch_size=B``: per layer, the divisor G of C whose statistic covers B·(C/G)·P values
closest (in log scale) to ``elements_per_statistic`` — by default what BatchNorm sees at a
healthy batch of 32, i.e. 32·P (P = positions at that layer, from the shape probe); so
G ≈ C·B/32. Transfer from a BatchNorm is exact in eval: the running statistics of group g are
the mixture statistics of its channels and γ, β are refitted (``transfer.fold_statistics``).

iebn (Instance-Enhancement BN): BN statistics copied; ``init="preserve"`` (default) sets
w = 0, b = −1, γ' = γ / sigmoid(−1), so the swap is function-preserving in train and eval;
``init="paper"`` is the official initialization (w = 0, b = −1, γ = 1; β kept). Shortcut
norms (a norm on the short branch into an add) stay BatchNorm as in the paper, found from
the graph (``shortcuts.py``); ``shortcut="iebn"`` converts them too.
"""
from __future__ import annotations

import math

import torch

from ... import layers
from ..graph.shortcuts import shortcut_context
from ..sources import SourceNorm
from .transfer import Transfer, group_statistics
from .registry import SiteInfo, SkipSite, register_target
from .standard import build_bn

REFERENCE_BATCH = 32


def auto_groups(num_channels: int, positions: int, batch_size: int, target: float | None) -> int:
    """The divisor G of C making B·(C/G)·P closest to ``target`` (default 32·P) in log scale."""
    target = target or REFERENCE_BATCH * positions
    divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
    return min(divisors, key=lambda g: (abs(math.log(batch_size * num_channels / g * positions / target)), g))


def build_bgn(source: SourceNorm, site: SiteInfo, options: dict):
    groups = options.get("num_groups", "auto")
    if "group_size" in options:
        if "num_groups" in options:
            raise ValueError("give num_groups or group_size, not both")
        size = options["group_size"]
        if not isinstance(size, int) or size < 1 or source.num_channels % size:
            raise ValueError(f"group_size={size!r} does not divide the {source.num_channels} channels of "
                             f"'{site.name}'")
        groups = source.num_channels // size
    positions = site.positions(source.channels_last)
    if groups == "auto":
        if "batch_size" not in options:
            raise ValueError("bgn needs num_groups=G, group_size=, or num_groups='auto' with batch_size= "
                             "(the per-device batch you train with)")
        if positions is None:
            raise ValueError(f"bgn num_groups='auto' needs the input shape at '{site.name}', which the "
                             f"shape probe could not get; pass an explicit num_groups")
        groups = auto_groups(source.num_channels, positions, options["batch_size"],
                             options.get("elements_per_statistic"))
    elif not isinstance(groups, int) or groups < 1 or source.num_channels % groups:
        raise ValueError(f"num_groups={groups!r} does not divide the {source.num_channels} channels of "
                         f"'{site.name}' (BGN groups split channels; G > C is not supported). Use "
                         f"num_groups='auto' with batch_size=, or overrides= for this layer")
    from_batch = source.kind in ("batch", "frozen_batch") and source.has_statistics
    module = layers.BatchGroupNorm(
        source.num_channels, groups, options.get("eps", source.eps or 1e-5),
        options.get("momentum", source.momentum if source.kind == "batch" else 0.1), affine=True,
        channels_last=source.channels_last, act=source.act, drop=source.drop)
    t = Transfer(source, module).affine()
    if not from_batch:
        module.statistics_pending = True
        t.built.reset += ["running_mean", "running_var"]
        t.note("the source has no batch statistics: the first training batch sets the group running "
               "statistics (calibrate or train before eval)")
        return t.exact("no")
    group_of_channel = torch.arange(source.num_channels) // (source.num_channels // groups)
    t.fold_statistics(group_of_channel, module.eps)
    mean_g, var_g = group_statistics(source.running_mean, source.running_var, group_of_channel)
    with torch.no_grad():
        module.running_mean.copy_(mean_g)
        module.running_var.copy_(var_g)
        if source.num_batches_tracked is not None:
            module.num_batches_tracked.copy_(source.num_batches_tracked)
    t.built.transferred += ["running_mean → group running_mean", "running_var → group running_var"]
    t.note(f"{groups} groups of {source.num_channels // groups} channels"
           + (f" ({(source.num_channels // groups) * positions} values per sample and statistic)"
              if positions else ""))
    same = groups == source.num_channels and "eps" not in options
    return t.exact("train+eval" if same else "eval")


def build_iebn(source: SourceNorm, site: SiteInfo, options: dict):
    if site.context is True and options.get("shortcut", "bn") == "bn":
        built = build_bn(source, site, {k: v for k, v in options.items() if k in ("eps", "momentum")})
        built.notes.insert(0, "kept as BatchNorm: a shortcut norm (short branch into an add), as in "
                              "the IEBN paper; shortcut='iebn' converts it too")
        return built
    positions = site.positions(source.channels_last)
    if positions is not None and positions < 2:
        raise SkipSite(f"input {site.input_shape} has one position: the instance context is the value itself")
    init = options.get("init", "preserve")
    if init not in ("preserve", "paper"):
        raise ValueError(f"iebn init={init!r}: use 'preserve' (function-preserving) or 'paper'")
    from_batch = source.kind in ("batch", "frozen_batch") and source.has_statistics
    module = layers.InstanceEnhancementBatchNorm(
        source.num_channels, options.get("eps", source.eps or 1e-5),
        options.get("momentum", source.momentum if source.kind == "batch" else 0.1),
        channels_last=source.channels_last, act=source.act, drop=source.drop)
    t = Transfer(source, module).affine().statistics()
    if site.context is None:
        t.note("no traced graph here: shortcut detection unavailable, converted as a main-path norm")
    module.statistics_pending = not from_batch
    t.built.reset += ["attention_weight", "attention_bias"]
    with torch.no_grad():
        if init == "paper":
            module.weight.fill_(1.0)
            t.built.transferred.remove("weight")
            t.built.reset.append("weight")
        else:
            module.weight.div_(torch.sigmoid(module.attention_bias))
            t.note("γ divided by sigmoid(b) = sigmoid(−1) so that γ·gate = γ at w = 0 (function-preserving)")
    same = init == "preserve" and from_batch and "eps" not in options and "momentum" not in options
    return t.exact("train+eval" if same and source.kind == "batch" else ("eval" if same else "no"))


register_target("bgn", build_bgn, batch_dependent=True,
                options=("num_groups", "group_size", "batch_size", "elements_per_statistic", "momentum"),
                summary="Batch Group Norm: batch statistics over groups of C/G channels; num_groups=G "
                        "or 'auto' with batch_size=")
register_target("iebn", build_iebn, batch_dependent=True, context=shortcut_context,
                options=("init", "shortcut", "momentum"),
                summary="Instance-Enhancement BN: γ gated by sigmoid(w·GAP(x) + b); shortcut norms stay BN")
