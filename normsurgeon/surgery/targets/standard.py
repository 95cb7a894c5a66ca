"""The standard targets: bn, frozen_bn, gn, ln, in, pn.

Each builder makes the new layer in the source's layout, keeps its fused drop/act, and
transfers by the rules of ``transfer.py``. What is exact (function-preserving):
  bn        from BatchNorm: train and eval;         from anything else: no (no statistics)
  frozen_bn from BatchNorm: eval (train used batch statistics); from a frozen BN: both
  gn        from GroupNorm with the same groups: both
  ln        from GroupNorm(1 group): both
  in        from InstanceNorm without running statistics: both
  pn        from LayerNorm over channels (ViT, ConvNeXt): both
From a BatchNorm, gn/ln/in/pn fold the running statistics into the new affine
(``fold_statistics=True``, see ``transfer.py``); ``fold_statistics=False`` copies γ, β as they are.
"""
from __future__ import annotations

import torch

from ... import layers
from .groups import resolve_groups
from ..sources import SourceNorm
from .transfer import Transfer
from .registry import SiteInfo, SkipSite, register_target


def _common(source: SourceNorm, options: dict) -> dict:
    return {"channels_last": source.channels_last, "act": source.act, "drop": source.drop}


def _eps(source: SourceNorm, options: dict) -> float:
    return options.get("eps", source.eps or 1e-5)


def build_bn(source: SourceNorm, site: SiteInfo, options: dict):
    from_batch = source.kind == "batch"
    module = layers.BatchNorm(
        source.num_channels, _eps(source, options),
        options.get("momentum", source.momentum if from_batch else 0.1),
        affine=source.affine, track_running_stats=source.track_running_stats if from_batch else True,
        statistics_pending=not (source.kind in ("batch", "frozen_batch") and source.has_statistics),
        **_common(source, options))
    t = Transfer(source, module).affine().statistics()
    if module.statistics_pending:
        t.note("the first training batch sets the running statistics (calibrate or train before eval)")
    if source.kind == "frozen_batch":
        t.note("frozen statistics become running statistics: training now uses batch statistics")
    return t.exact("train+eval" if from_batch and "eps" not in options and "momentum" not in options else "no")


def build_frozen_bn(source: SourceNorm, site: SiteInfo, options: dict):
    if not (source.kind in ("batch", "frozen_batch") and source.has_statistics):
        raise SkipSite(f"frozen_bn needs statistics to freeze and this {source.kind} norm has none: "
                       f"convert to 'bn', calibrate or train, then to 'frozen_bn'")
    module = layers.FrozenBatchNorm(
        source.num_channels, _eps(source, options),
        trainable_affine=options.get("trainable_affine", False), **_common(source, options))
    t = Transfer(source, module).affine().statistics()
    if source.num_batches_tracked is not None and "num_batches_tracked" not in t.built.dropped:
        t.built.dropped.append("num_batches_tracked")
    if source.kind == "batch":
        t.note("batch statistics are frozen at the running estimates (train = eval)")
    if "eps" in options:
        return t.exact("no")
    return t.exact({"batch": "eval", "frozen_batch": "train+eval"}.get(source.kind, "no"))


def _fold(t: Transfer, options: dict, groups: int, eps: float) -> Transfer:
    """Fold BN statistics into the affine over ``groups`` contiguous channel groups (default on)."""
    if options.get("fold_statistics", True):
        channels = t.source.num_channels
        t.fold_statistics(torch.arange(channels) // (channels // groups), eps)
    return t


def _check_elements(count: int | None, what: str) -> None:
    if count is not None and count < 2:
        raise SkipSite(f"{what} would be over a single value: the output would be constant")


def build_gn(source: SourceNorm, site: SiteInfo, options: dict):
    groups = resolve_groups(source.num_channels, options.get("num_groups"), options.get("group_size"),
                            where=site.name)
    positions = site.positions(source.channels_last)
    if positions is not None:
        _check_elements(source.num_channels // groups * positions,
                        f"GroupNorm({groups} groups) on input {site.input_shape}")
    module = layers.GroupNorm(source.num_channels, groups, _eps(source, options), source.affine,
                              **_common(source, options))
    t = _fold(Transfer(source, module).affine(), options, groups, module.eps).drop_statistics()
    if groups == source.num_channels:
        t.note("one channel per group: this GroupNorm is an InstanceNorm")
    same = source.kind == "group" and source.num_groups == groups and "eps" not in options
    return t.exact("train+eval" if same else "no")


def build_ln(source: SourceNorm, site: SiteInfo, options: dict):
    positions = site.positions(source.channels_last)
    if positions is not None:
        _check_elements(source.num_channels * positions, f"LayerNorm on input {site.input_shape}")
    module = layers.GroupNorm1(source.num_channels, _eps(source, options), source.affine,
                              **_common(source, options))
    t = _fold(Transfer(source, module).affine(), options, 1, module.eps).drop_statistics()
    if source.kind == "positional":
        t.note("the source normalized each position over channels; 'ln' normalizes over "
               "channels and positions together (use 'pn' to keep the source's math)")
    same = source.kind == "group" and source.num_groups == 1 and "eps" not in options
    return t.exact("train+eval" if same else "no")


def build_in(source: SourceNorm, site: SiteInfo, options: dict):
    positions = site.positions(source.channels_last)
    if positions is not None and positions < 2:
        raise SkipSite(f"input {site.input_shape} has one position per channel: instance "
                       f"statistics are undefined")
    module = layers.InstanceNorm(source.num_channels, _eps(source, options), source.affine,
                                 **_common(source, options))
    t = _fold(Transfer(source, module).affine(), options, source.num_channels, module.eps)
    t.drop_statistics()
    same = source.kind == "instance" and not source.has_statistics and "eps" not in options
    return t.exact("train+eval" if same else "no")


def build_pn(source: SourceNorm, site: SiteInfo, options: dict):
    if source.num_channels < 2:
        raise SkipSite("one channel: a norm over channels would output a constant")
    module = layers.PositionalNorm(source.num_channels, _eps(source, options), source.affine,
                                   **_common(source, options))
    t = _fold(Transfer(source, module).affine(), options, 1, module.eps).drop_statistics()
    same = source.kind == "positional" and "eps" not in options
    return t.exact("train+eval" if same else "no")


register_target("bn", build_bn, batch_dependent=True, options=("momentum",),
                summary="BatchNorm: batch statistics in training, running statistics in eval")
register_target("frozen_bn", build_frozen_bn, options=("trainable_affine",),
                summary="BatchNorm with frozen statistics (train = eval); trainable_affine=True "
                        "keeps γ, β trainable")
register_target("gn", build_gn, options=("num_groups", "group_size", "fold_statistics"),
                summary="GroupNorm over (C/G, positions) per sample; num_groups= or group_size=")
register_target("ln", build_ln, options=("fold_statistics",),
                summary="LayerNorm over (C, positions) per sample (GroupNorm with G=1), "
                        "per-channel affine")
register_target("in", build_in, options=("fold_statistics",),
                summary="InstanceNorm over positions per sample and channel, per-channel affine")
register_target("pn", build_pn, options=("fold_statistics",),
                summary="Positional Norm over C at each position (a transformer's LayerNorm)")
