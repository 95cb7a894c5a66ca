"""Where a norm site's pre-activation is observed, and in which shape.

The pre-activation is the norm's output after its affine and before its activation: the input
of the module's non-Identity ``act`` child when it has one (timm NormAct layers, normsurgeon
layers with a fused activation, PN-Act), else the module's output. It is handed over viewed as
(N, C, S): channels-last layouts (a transformer's LayerNorm) are moved to channels-first. A
module with a ``preactivation(x)`` method (PN-Act, whose φ also runs on the proxy grid and may
get a rescaled input) is asked for the value instead.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..surgery.graph.sites import find_sites


def as_ncs(y: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(N, C, *) or (N, *, C) → (N, C, S)."""
    if channels_last:
        y = y.movedim(-1, 1)
    return y.reshape(y.shape[0], y.shape[1], -1)


def attach_preactivation_hooks(model: nn.Module, callback: Callable[[str, torch.Tensor], None],
                               include: list[str] | None = None) -> list:
    """Call ``callback(site_name, y (N, C, S))`` at every readable norm site's pre-activation.

    Returns the hook handles; the caller must ``remove()`` them.
    """
    handles = []
    for site in find_sites(model):
        if site.match.reader is None or (include is not None and site.name not in include):
            continue
        channels_last = site.match.reader(site.module).channels_last

        def record(y, name=site.name, channels_last=channels_last):
            if isinstance(y, torch.Tensor) and y.ndim >= 2:
                callback(name, as_ncs(y, channels_last))

        act = getattr(site.module, "act", None)
        if hasattr(site.module, "preactivation"):  # the module computes it on request (PN-Act)
            handles.append(site.module.register_forward_hook(
                lambda m, args, out, record=record: record(m.preactivation(args[0]))))
        elif isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
            handles.append(act.register_forward_pre_hook(lambda m, args, record=record: record(args[0])))
        else:
            handles.append(site.module.register_forward_hook(lambda m, args, out, record=record: record(out)))
    return handles
