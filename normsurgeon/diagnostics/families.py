"""The normalization family of a site: which failure modes its norm can have, and its name in words.

A failure mode belongs to what a norm normalizes over (DESIGN.md §5):
- channel collapse (f_A → 1) needs a norm that does not centre each channel over the data: group,
  layer, positional and proxy norms, and Batch Group Norm with several channels per group. A
  BatchNorm (or InstanceNorm) centres every channel, so its f_A is set by its learned β, γ;
- instance-variance failure (f_B, CV_σ → 0) needs a per-sample norm: instance, group, layer,
  positional, proxy;
- noisy batch statistics need batch statistics (a layer with running statistics).
A site of unknown family gets every rule.
"""
from __future__ import annotations

from torch import nn

from ..surgery.sources import match_source

NAMES = {
    "batch": "BatchNorm", "batch_group": "Batch Group Norm", "frozen_batch": "frozen BatchNorm",
    "group": "GroupNorm", "layer": "LayerNorm", "positional": "Positional Norm (per-position LayerNorm)",
    "instance": "InstanceNorm", "proxy": "Proxy Norm (GN/LN + PN-Act)", "unknown": "normalization",
}
COLLAPSE = {"group", "layer", "positional", "proxy", "batch_group", "unknown"}
INSTANCE = {"instance", "group", "layer", "positional", "proxy", "unknown"}


def norm_family(module: nn.Module) -> str:
    """One key of ``NAMES`` for a norm module."""
    match = match_source(module)
    if match.reader is None:
        return "unknown"
    try:
        kind = match.reader(module).kind
    except Exception:  # noqa: BLE001 - an unreadable configuration: the rules still apply
        return "unknown"
    groups, channels = getattr(module, "num_groups", None), getattr(module, "num_channels", None)
    if type(module).__name__ == "ProxyNormAct":
        return "proxy"
    if kind == "batch":
        return "batch_group" if groups is not None and channels is not None and groups < channels else "batch"
    if kind == "group":
        return "layer" if groups == 1 else "group"
    return kind if kind in NAMES else "unknown"


def family_names(families) -> str:
    """'GroupNorm and LayerNorm' for the families present, in a stable order."""
    present = [NAMES[f] for f in NAMES if f in set(families)] or [NAMES["unknown"]]
    return present[0] if len(present) == 1 else ", ".join(present[:-1]) + " and " + present[-1]
