"""``fold``: an inference copy of a model with every eval-mode affine norm folded into a linear layer.

A norm that is the affine map y = s·x + t per channel in eval (``affine.py``) disappears into the
linear layer next to it, found in the model's torch.fx graph (normsurgeon's tracer, norms as leaves):

- **Into the producer** (preferred): the Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear whose output
  is the norm's input. W' = s·W and b' = s·b + t along its output channels. Always exact (any
  padding, stride, dilation, groups), because the map acts on the layer's output.
- **Into the consumer**, when no producer qualifies: the Conv or Linear that takes the norm's output,
  W' = W·s along its input channels and b' = b + W·t (for a conv, t summed over its kernel window).
  Exact only when every output position sees every kernel tap on real input values: no zero padding
  (``padding=0``), or a padding mode that copies values (``reflect``, ``replicate``, ``circular``),
  or a Linear. A zero-padded conv would see t added to its padded border; it is not used.
  Only a norm with nothing after its affine part (no fused act, not IEBN) can fold forward.

The partner must be called exactly once in the forward, not share its weight with another layer,
compute ``F.conv*``/``F.linear`` on its own ``weight`` (plain torch layers and timm's ``Conv2dSame``;
weight-standardized or parametrized convs are refused), and be joined to the norm by a path on which
each tensor has one user (``nn.Identity`` modules are skipped). A Linear partner needs the norm's
channels on its last axis: a channels-last layout, or a 2-d (N, C) input (checked on meta tensors).

What stays at the site: nothing (``nn.Identity``), the fused drop/act (``FoldedAct``) or IEBN's
gate (``InstanceGate``). A ``dsbn`` site that cannot fold becomes a ``frozen_bn`` of the chosen domain,
so the folded model needs no routing. Every other site is kept as it is, with the reason in the report.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .. import layers
from ..domains.routing import domain_layers, domains_of
from ..layers.cross_iteration_bn import _ConvTap
from ..model_state import preserved
from ..surgery.graph.probe import default_input_size, meta_forward
from ..surgery.graph.sites import Site, find_sites
from ..surgery.graph.tracing import trace
from .affine import EvalAffine, eval_affine, require_eval_norms

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class FoldRow:
    """One norm site: folded into which layer (and on which side), or kept and why."""

    site: str
    norm: str
    status: str  # "folded" or "kept"
    into: str | None = None
    side: str | None = None  # "producer" (the layer before) or "consumer" (the layer after)
    remains: str | None = None  # what stays at the site: FoldedAct, InstanceGate, FrozenBatchNorm
    reason: str | None = None


@dataclass
class FoldReport:
    """Per-site account of ``fold``; ``norms_left`` counts the normalization modules still in the model."""

    rows: list[FoldRow] = field(default_factory=list)
    norms_left: int = 0
    left_types: dict[str, int] = field(default_factory=dict)

    @property
    def folded(self) -> list[FoldRow]:
        return [r for r in self.rows if r.status == "folded"]

    @property
    def kept(self) -> list[FoldRow]:
        return [r for r in self.rows if r.status == "kept"]

    def summary(self) -> str:
        left = ", ".join(f"{n} {t}" for t, n in self.left_types.items()) or "none"
        return (f"{len(self.folded)} of {len(self.rows)} norm sites folded; "
                f"{self.norms_left} norm modules left ({left})")

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "norms_left": self.norms_left, "left_types": dict(self.left_types),
                "sites": [vars(r) for r in self.rows]}

    def __str__(self) -> str:
        lines = [self.summary()]
        for r in self.rows:
            if r.status == "folded":
                what = f"folded into {r.side} '{r.into}'" + (f", {r.remains} stays" if r.remains else "")
            else:
                what = f"kept: {r.reason}" + (f" ({r.remains})" if r.remains else "")
            lines.append(f"  {r.site} [{r.norm}]: {what}")
        return "\n".join(lines)


def fold(model: nn.Module, *, domain=None, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """An inference copy of ``model`` with every eval-mode affine norm folded into a conv/linear layer.

    The norms must be in eval mode (``model.eval()``); ``model`` itself is never modified. A model
    converted to ``dsbn`` folds for one domain: ``domain=`` (a name or index). ``input_size``
    (C, H, W) is used only to check the layout of Linear partners (default: the model's
    ``pretrained_cfg`` or 224²). The copy keeps the class, every module's train/eval flag and every
    other module; its report is ``folded.normsurgeon_fold_report`` (``print`` it).

        >>> folded = ns.fold(model.eval())
        >>> print(folded.normsurgeon_fold_report)   # per site: folded into which conv, or why not

    Raises TypeError for a non-module, ValueError for norms in training mode, a ``dsbn`` model without
    ``domain`` (the message lists the domains), an unknown domain, or ``domain`` on a model without dsbn.
    """
    _check_input(model, domain)
    work = copy.deepcopy(model)
    with preserved(work):
        graph = _Graph(work, input_size)
    report = FoldReport()
    folded_cbn: list[nn.Module] = []
    with torch.no_grad():
        for site in find_sites(work):
            row = _fold_site(work, site, graph, domain)
            report.rows.append(row)
            if row.status == "folded" and isinstance(site.module, layers.CrossIterationBatchNorm):
                folded_cbn.append(site.module)
    _remove_conv_taps(work, folded_cbn)
    left = Counter(type(s.module).__name__ for s in find_sites(work))
    report.norms_left, report.left_types = sum(left.values()), dict(left)
    work.normsurgeon_fold_report = report
    if hasattr(work, "normsurgeon_recipes"):
        del work.normsurgeon_recipes  # a folded model is not rebuilt by ns.load: save its state_dict or export it
    return work


def _check_input(model: nn.Module, domain) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold takes a model (nn.Module), got {type(model).__name__}")
    require_eval_norms(model, ValueError, "fold needs them in eval mode, since batch statistics cannot be "
                       "reproduced by any fixed weight", "Call model.eval() first (fold returns a new model; "
                       "yours is not changed).")
    has_dsbn = bool(domain_layers(model))
    if has_dsbn and domain is None:
        names = domains_of(model)
        listing = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
        raise ValueError(f"this model has domain-specific BatchNorm (dsbn) layers: they fold for one domain. "
                         f"Pass fold(model, domain=...) with one of its domains: {listing}")
    if not has_dsbn and domain is not None:
        raise ValueError(f"domain={domain!r} was given, but the model has no domain-specific BatchNorm (dsbn) layer")


class _Graph:
    """The model's eval-mode fx graph (or why there is none), call counts, and layouts on demand."""

    def __init__(self, model: nn.Module, input_size):
        self.model, self.input_size = model, input_size
        traced = trace(model, train=False)
        self.error = None if traced.ok else traced.error
        self.nodes: dict[str, list[fx.Node]] = {}
        if traced.ok:
            for node in traced.graph.nodes:
                if node.op == "call_module":
                    self.nodes.setdefault(node.target, []).append(node)
        distinct = {id(m): m for m in model.modules()}.values()
        counts = Counter(id(p) for m in distinct for p in m.parameters(recurse=False))
        self.shared = {pid for pid, n in counts.items() if n > 1}
        self._ndims: dict[str, set[int]] | None = None

    def calls(self, name: str) -> list[fx.Node]:
        return self.nodes.get(name, [])

    def module(self, name: str) -> nn.Module | None:
        """The module called by a graph node now (a norm folded earlier is its remainder by then)."""
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def input_ndims(self, names: list[str]) -> set[int] | str:
        """Ranks of the inputs seen at a norm (by any of its names), from one meta forward, or the
        reason they are unknown."""
        if self._ndims is None:
            watch = {n: s.module for s in find_sites(self.model) for n in s.names}
            size = tuple(self.input_size) if self.input_size else default_input_size(self.model)
            dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
            with preserved(self.model):
                probe = meta_forward(self.model, torch.zeros((2,) + size, dtype=dtype), watch, train=False)
            self._probe_error = probe.error
            self._ndims = {n: {len(io[0]) for io in shapes} for n, shapes in probe.shapes.items()}
        ranks = set().union(*(self._ndims.get(n, set()) for n in names))
        if not ranks:
            return (f"its input shape is unknown (the model did not run on meta tensors of size {self.input_size or 'default'}: "
                    f"{self._probe_error}; pass input_size=)") if self._probe_error else "its input shape is unknown"
        return ranks


def _next_layer(node: fx.Node, graph: _Graph, forward: bool) -> fx.Node | str:
    """The node next to ``node``: the one computing its input, or its only user (``forward``), with
    ``nn.Identity`` modules skipped. Every tensor on the way must have exactly one user, and each
    step must be a call on that tensor alone. Returns the node or the reason."""
    while True:
        if forward:
            users = list(node.users)
            if len(users) != 1:
                return f"its output has {len(users)} users"
            nxt = users[0]
            if nxt.args != (node,) or nxt.kwargs:
                return "its output is not the only input of the op after it"
        else:
            if node.args[1:] or node.kwargs or not node.args or not isinstance(node.args[0], fx.Node):
                return "it is not called on a single tensor"
            nxt = node.args[0]
            if len(nxt.users) != 1:
                return f"its input is also used elsewhere ({len(nxt.users)} users)"
        if nxt.op == "call_module" and type(graph.module(nxt.target)) is nn.Identity:
            node = nxt
            continue
        return nxt


def _linear_problem(module: nn.Module, graph: _Graph) -> str | None:
    """Why ``module`` cannot absorb an affine map (None if it can): type, forward, weight."""
    import timm.layers as tl
    plain = isinstance(module, _CONVS + _TRANSPOSED + (nn.Linear,)) and (
        type(module).forward in {c.forward for c in _CONVS + _TRANSPOSED + (nn.Linear,)}
        or type(module) is tl.Conv2dSame)
    if not plain:
        return f"it is a {type(module).__name__}, not a plain Conv/ConvTranspose/Linear"
    if parametrize.is_parametrized(module):
        return f"its {type(module).__name__}'s weight is parametrized (computed in its forward)"
    if id(module.weight) in graph.shared or (module.bias is not None and id(module.bias) in graph.shared):
        return f"its {type(module).__name__} shares a weight with another layer"
    return None


def _partner(site: Site, node: fx.Node, affine: EvalAffine, graph: _Graph, side: str) -> tuple[str, nn.Module] | str:
    """(name, module) of the layer on ``side`` that can absorb ``affine`` exactly, or the reason."""
    other = _next_layer(node, graph, forward=side == "consumer")
    if isinstance(other, str):
        return other
    if other.op != "call_module":
        what = {"placeholder": "a model input", "output": "the model output"}.get(
            other.op, f"{getattr(other.target, '__name__', other.target)}()")
        return f"it is {'fed by' if side == 'producer' else 'followed by'} {what}, not a layer"
    name, module = other.target, graph.module(other.target)
    problem = _linear_problem(module, graph)
    if problem:
        return problem
    if len(graph.calls(name)) != 1:
        return f"'{name}' is called {len(graph.calls(name))} times in the forward"
    channels = affine.scale.numel()
    if isinstance(module, nn.Linear):
        wanted = module.out_features if side == "producer" else module.in_features
        if wanted != channels:
            return f"'{name}' has {wanted} features, the norm {channels} channels"
        ranks = {2} if affine.channels_last else graph.input_ndims(site.names)
        if isinstance(ranks, str):
            return ranks
        if ranks != {2}:
            return (f"'{name}' acts on the last axis and the norm on axis 1 of its {sorted(ranks)}-d input "
                    f"(the same axis only for 2-d inputs)")
        return name, module
    if affine.channels_last:
        return f"the norm's channels are on the last axis and '{name}''s on axis 1"
    wanted = module.out_channels if side == "producer" else module.in_channels
    if wanted != channels:
        return f"'{name}' has {wanted} channels, the norm {channels}"
    if side == "consumer":
        if isinstance(module, _TRANSPOSED):
            return f"'{name}' is a transposed conv: the shift t would reach its border outputs unevenly"
        zero_pad = module.padding_mode == "zeros" and (
            any(module._reversed_padding_repeated_twice)
            or (type(module).__name__ == "Conv2dSame" and any(k > 1 for k in module.kernel_size)))
        if zero_pad:
            return (f"'{name}' pads with zeros: the norm's shift would be missing on the padded border "
                    f"(exact only without padding or with reflect/replicate/circular padding)")
    return name, module


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.to(dtype=like.dtype, device=like.device),
                                       requires_grad=like.requires_grad))


def fold_into_producer(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``module``'s output y becomes s·y + t per output channel: W' = s·W, b' = s·b + t (in place)."""
    w = module.weight.detach().double()
    if isinstance(module, _TRANSPOSED):  # (Cin, Cout/G, *k): output channel o = g·Cout/G + j
        g = module.groups
        w = w.view(g, w.shape[0] // g, *w.shape[1:]) * scale.view(g, 1, -1, *[1] * (w.ndim - 2))
        w = w.view(module.weight.shape)
    else:  # (Cout, ...)
        w = w * scale.view(-1, *[1] * (w.ndim - 1))
    bias = module.bias.detach().double() if module.bias is not None else torch.zeros_like(shift)
    _set_parameter(module, "weight", w, module.weight)
    _set_parameter(module, "bias", bias * scale + shift, module.bias if module.bias is not None else module.weight)


def fold_into_consumer(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``module``'s input x becomes s·x + t per input channel: W' = W·s, b' = b + W·t (in place)."""
    w = module.weight.detach().double()
    if isinstance(module, nn.Linear):
        extra = w @ shift
        w = w * scale
    else:  # (Cout, Cin/G, *k) seen as (G, Cout/G, Cin/G, K)
        g = module.groups
        grouped = w.reshape(g, w.shape[0] // g, w.shape[1], -1)
        extra = (grouped * shift.view(g, 1, -1, 1)).sum(dim=(2, 3)).reshape(-1)
        w = (grouped * scale.view(g, 1, -1, 1)).reshape(w.shape)
    bias = module.bias.detach().double() if module.bias is not None else torch.zeros_like(extra)
    _set_parameter(module, "weight", w, module.weight)
    _set_parameter(module, "bias", bias + extra, module.bias if module.bias is not None else module.weight)


def _install(model: nn.Module, site: Site, module: nn.Module) -> None:
    for name in site.names:
        model.set_submodule(name, module)


def _fold_site(model: nn.Module, site: Site, graph: _Graph, domain) -> FoldRow:
    norm = type(site.module).__name__
    affine = eval_affine(site.module, domain)
    if isinstance(affine, str):
        return FoldRow(site.name, norm, "kept", reason=affine)
    node = _graph_node(site, graph)
    if isinstance(node, str):
        return _keep(model, site, affine, domain, node)
    side, partner = "producer", _partner(site, node, affine, graph, "producer")
    if isinstance(partner, str):
        if affine.remainder is not None:
            return _keep(model, site, affine, domain,
                         f"no layer before can absorb it ({partner}), and its {type(affine.remainder).__name__} "
                         f"must run between it and the layer after")
        consumer = _partner(site, node, affine, graph, "consumer")
        if isinstance(consumer, str):
            return _keep(model, site, affine, domain,
                         f"no layer before ({partner}) or after ({consumer}) can absorb it")
        side, partner = "consumer", consumer
    name, layer = partner
    (fold_into_producer if side == "producer" else fold_into_consumer)(layer, affine.scale, affine.shift)
    remainder = affine.remainder if affine.remainder is not None else nn.Identity()
    remainder.training = site.module.training  # its own flag only: drop/act keep theirs
    _install(model, site, remainder)
    return FoldRow(site.name, norm, "folded", into=name, side=side,
                   remains=type(affine.remainder).__name__ if affine.remainder is not None else None)


def _graph_node(site: Site, graph: _Graph) -> fx.Node | str:
    """The one graph node calling the site's module, or why there is not exactly one."""
    if graph.error:
        return f"the model could not be traced ({graph.error})"
    calls = [n for name in site.names for n in graph.calls(name)]
    if not calls:
        return "it is not called in the traced graph (inside a leaf module, or unused)"
    if len(calls) > 1:
        return f"it is called {len(calls)} times in the forward"
    return calls[0]


def _keep(model: nn.Module, site: Site, affine: EvalAffine, domain, why: str) -> FoldRow:
    """A site that cannot fold: kept as is, except dsbn, which becomes frozen_bn of ``domain``."""
    norm = type(site.module).__name__
    if not isinstance(site.module, layers.DomainSpecificBatchNorm):
        return FoldRow(site.name, norm, "kept", reason=why)
    old = site.module
    frozen = layers.FrozenBatchNorm(affine.scale.numel(), eps=0.0, channels_last=affine.channels_last,
                                    act=getattr(old, "act", None), drop=getattr(old, "drop", None))
    # y = s·x + t as a frozen BN with mean 0, var 1, eps 0: γ = s, β = t
    for name, value in (("weight", affine.scale), ("bias", affine.shift)):
        getattr(frozen, name).copy_(value)
    ref = old.running_mean
    frozen.to(dtype=ref.dtype, device=ref.device).training = old.training
    _install(model, site, frozen)
    return FoldRow(site.name, norm, "kept", reason=why, remains=f"FrozenBatchNorm of domain {domain!r}")


def _remove_conv_taps(model: nn.Module, folded: list[nn.Module]) -> None:
    """Drop the forward hooks by which folded Cross-Iteration BN layers read their conv's input."""
    gone = {id(m) for m in folded}
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _ConvTap) and (hook.layer() is None or id(hook.layer()) in gone):
                del module._forward_hooks[key]
