"""Recording pre-activation statistics at every normalization site of a model.

``Recorder(model)`` hooks each norm site found by ``surgery.graph.sites.find_sites`` at its
*pre-activation* (``hooks.py``: after the norm's affine, before its activation, viewed as
(N, C, S)) and feeds streaming ``InstanceMoments``;
``nonfinite[name]`` counts (instance, channel) pairs that held a NaN or inf. Hooks are
removed on ``close()`` / leaving the ``with`` block; the model is otherwise untouched.

    with Recorder(model) as rec:
        for x in batches:
            model(x)
    table = rec.statistics()   # one LayerStatistics per site, in execution order
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..surgery.graph.sites import find_sites
from .accumulators import InstanceMoments
from .families import norm_family
from .hooks import attach_preactivation_hooks


@dataclass
class LayerStatistics:
    """Pre-activation statistics of one site (power split, failure-mode fractions)."""

    name: str
    depth: int  # execution order, 0 = first site called
    module_type: str
    norm: str  # the norm's family (``families.NAMES``): which failure modes apply
    channels: int
    instances: int
    positions: int
    A: float
    B: float
    W: float
    f_A: float  # channel collapse (LayerNorm failure mode)
    f_B: float  # inter-instance power (≈ 0 after InstanceNorm: instance-variance failure)
    f_W: float
    cv_sigma: float
    mean: torch.Tensor  # (C,) population mean per channel
    var: torch.Tensor  # (C,) population variance per channel

    def as_row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, torch.Tensor)}



class Recorder:
    """Streaming pre-activation statistics at every norm site of ``model`` (module docstring)."""

    def __init__(self, model: nn.Module, include: list[str] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Recorder expects an nn.Module, got {type(model).__name__}")
        self.model = model
        self.moments: dict[str, InstanceMoments] = {}
        self.order: list[str] = []
        self.nonfinite: dict[str, int] = {}
        sites = find_sites(model)
        self.types = {site.name: type(site.module).__name__ for site in sites}
        self.families = {site.name: norm_family(site.module) for site in sites}
        self._handles = attach_preactivation_hooks(model, self._record, include)

    def _record(self, name: str, y: torch.Tensor) -> None:
        if name not in self.moments:
            self.moments[name] = InstanceMoments(y.shape[1], y.device)
            self.order.append(name)
            self.nonfinite[name] = 0
        # (instance, channel) pairs with a NaN/inf value; a device tensor: no sync per batch
        self.nonfinite[name] += self.moments[name].update(y)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def statistics(self) -> list[LayerStatistics]:
        """One ``LayerStatistics`` per site that saw data, in execution order."""
        rows = []
        for depth, name in enumerate(self.order):
            mom = self.moments[name]
            split = mom.power_split()
            total = (split["A"] + split["B"] + split["W"]).clamp_min(torch.finfo(torch.float64).tiny)
            rows.append(LayerStatistics(
                name, depth, self.types[name], self.families[name], mom.channels, int(mom.count), int(mom.positions),
                float(split["A"]), float(split["B"]), float(split["W"]), float(split["A"] / total),
                float(split["B"] / total), float(split["W"] / total), float(mom.cv_sigma()),
                split["mean"].cpu(), split["var"].cpu()))
        return rows
