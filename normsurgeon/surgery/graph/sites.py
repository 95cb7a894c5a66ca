"""Finding every normalization site of a model: module walk + traced graph + meta-shape probe.

The module walk finds every norm module, also inside FX leaf modules and code FX cannot
trace. The graph adds how many times each norm is called, which norms sit inside leaves, and
functional norm calls (``F.layer_norm`` in a custom forward) that have no module to swap. The
probe adds the input shape seen at each site.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..sources import Match, match_source
from .probe import ProbeResult, default_input_size, meta_forward
from .tracing import TraceResult, trace

FUNCTIONAL_NORMS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm, torch.batch_norm,
                    torch.layer_norm, torch.group_norm, torch.instance_norm, torch.rms_norm}


@dataclass
class Site:
    """One norm module (possibly reachable under several names)."""

    name: str
    module: nn.Module
    match: Match
    aliases: list[str] = field(default_factory=list)
    calls: int | None = None
    inside_leaf: str | None = None
    io_shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self.io_shapes[0][0] if self.io_shapes else None

    @property
    def names(self) -> list[str]:
        return [self.name] + self.aliases

    def install(self, model: nn.Module, new: nn.Module) -> None:
        """Put ``new`` in this site's place (under every name it has)."""
        for name in self.names:
            model.set_submodule(name, new)

    def restore(self, model: nn.Module) -> None:
        """Undo ``install``: the original module back in its place."""
        for name in self.names:
            model.set_submodule(name, self.module)


@dataclass
class Analysis:
    sites: list[Site]
    functional: list[dict]
    trace: TraceResult
    probe: ProbeResult
    example: torch.Tensor | None


def find_sites(model: nn.Module) -> list[Site]:
    """Every norm module in ``model`` (not descending into a norm's own children)."""
    by_id: dict[int, Site] = {}
    inside_site: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(p + ".") for p in inside_site):
            continue
        match = match_source(module)
        if not match.is_site:
            continue
        inside_site.append(name)
        if id(module) in by_id:
            by_id[id(module)].aliases.append(name)
        else:
            by_id[id(module)] = Site(name, module, match)
    return list(by_id.values())


def _annotate_with_graph(sites: list[Site], result: TraceResult) -> list[dict]:
    calls: dict[str, int] = {}
    called_modules: set[str] = set(result.leaves_added)
    functional = []
    for node in result.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            called_modules.add(node.target)
        elif node.op == "call_function" and node.target in FUNCTIONAL_NORMS:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            owner = stack[-1][0] if stack else ""
            functional.append({"function": getattr(node.target, "__name__", str(node.target)),
                               "module": owner, "node": node.name})
    for site in sites:
        counted = [calls[n] for n in site.names if n in calls]
        if counted:
            site.calls = sum(counted)
            continue
        leaves = [m for m in called_modules if any(n.startswith(m + ".") for n in site.names)]
        if leaves:
            site.inside_leaf = max(leaves, key=len)
        else:
            site.calls = 0
    return functional


def analyze(model: nn.Module, input_size: tuple[int, ...] | None = None,
            probe: bool = True) -> Analysis:
    """Sites with call counts and input shapes; never raises for tracing/probing problems."""
    sites = find_sites(model)
    traced = trace(model)
    functional = _annotate_with_graph(sites, traced) if traced.ok else []
    example, shapes = None, ProbeResult(error="probe disabled")
    if probe:
        size = tuple(input_size) if input_size else default_input_size(model)
        example = torch.zeros((2,) + size)
        norms = _shape_rules(sites)
        watch = {n: s.module for s in sites for n in s.names}
        # the modules whose forward calls F.layer_norm & co.: their inputs, to probe those calls later
        owners = {OWNER_PREFIX + c["module"]: model.get_submodule(c["module"]) for c in functional}
        shapes = meta_forward(model, example, {**watch, **owners}, train=False, pass_through=norms)
        missed = {n: m for n, m in watch.items() if n not in shapes.shapes}
        if missed and not shapes.error:  # train-only branches (auxiliary heads): probe them too
            extra = meta_forward(model, example, missed, train=True, pass_through=norms)
            shapes.shapes.update(extra.shapes)
        for site in sites:
            for n in site.names:
                site.io_shapes += shapes.shapes.get(n, [])
    return Analysis(sites, functional, traced, shapes, example)


OWNER_PREFIX = "owner:"  # probe keys of the modules owning functional norm calls


def _shape_rules(sites: list[Site]) -> dict[nn.Module, tuple[int, bool]]:
    """{module: (C, channels_last)} of every site whose source reads: what the probe checks instead
    of running it (sources that cannot be read run as they are)."""
    rules = {}
    for site in sites:
        if site.match.reader is None:
            continue
        try:
            source = site.match.reader(site.module)
        except Exception:  # noqa: BLE001  (reported by the conversion; here it just runs)
            continue
        rules[site.module] = (source.num_channels, source.channels_last)
    return rules
