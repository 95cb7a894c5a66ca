"""Functional norms as sites: ``F.layer_norm`` & co. called inside a traced forward.

A call such as ``F.group_norm(x, 4, self.weight, self.bias)`` in a custom module's forward has no
module to swap. It becomes a site of its own, named after the child module that will replace it
(``<owner>.group_norm_0``: the owner's first ``F.group_norm`` call). Its source is read from the
call's arguments: parameters and buffers of the owner (``get_attr`` nodes) and constants.
Converting it is a graph pass on the owner: its forward is traced in train and in eval mode,
the call node is replaced by a call of the new child module in both graphs, and the instance gets
the rewritten forward (``forward_rewrite.py``). The owner keeps its class and every state_dict key
(its own tensors stay, unused by the new forward); the new norm's tensors live in the child, so a
converted checkpoint reloads into ``convert(fresh_model, same recipe)``.

Each site gets the shapes of its call for convert's checks: the owner's input from the whole-model probe,
then its eval graph run on meta tensors. proxy_* targets make plain GroupNorms here (no activation
pairing for a call). Handled: ``F.batch_norm``, ``F.instance_norm``, ``F.group_norm``, ``F.layer_norm`` and
``torch.layer_norm`` over one (channel) axis. Other calls (``F.rms_norm``, a weight computed in
forward, an owner forward with several inputs) are sites reported as unsupported, with why.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..sources import Match, SourceNorm, UnsupportedSource
from ...model_state import preserved
from . import forward_rewrite
from .probe import ProbeResult, on_meta
from .sites import FUNCTIONAL_NORMS, OWNER_PREFIX, Site
from .tracing import trace

_PARAMETERS = {  # positional parameter names and defaults of each handled function
    F.batch_norm: (("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                   {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}),
    F.instance_norm: (("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum",
                       "eps"), {"running_mean": None, "running_var": None, "weight": None, "bias": None,
                                "use_input_stats": True, "momentum": 0.1, "eps": 1e-5}),
    F.group_norm: (("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}),
    F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}),
    torch.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
                       {"weight": None, "bias": None, "eps": 1e-5}),
}
_NAMES = {F.batch_norm: "batch_norm", F.instance_norm: "instance_norm", F.group_norm: "group_norm",
          F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm"}


class FunctionalNorm(nn.Module):
    """Stand-in module for a functional norm call, so the pipeline treats it like any site."""

    def __init__(self, function: str, owner: str, source: SourceNorm | None):
        super().__init__()
        self.function, self.owner, self.source = function, owner, source

    def extra_repr(self) -> str:
        return f"{self.function} in '{self.owner}'"


def _read(owner: nn.Module, node: fx.Node) -> SourceNorm:
    """The SourceNorm of one call, from its arguments (tensors are the owner's own)."""
    names, defaults = _PARAMETERS[node.target]
    values = dict(defaults)
    values.update(zip(names, node.args))
    values.update(node.kwargs)

    def value(name):
        v = values.get(name)
        if isinstance(v, fx.Node):
            if v.op != "get_attr":
                raise UnsupportedSource(f"its {name} is computed in the forward ({v.name}), not a parameter, buffer "
                                        f"or constant, so it cannot be read before running the model")
            return functools.reduce(getattr, v.target.split("."), owner)
        return v

    weight, bias, eps = value("weight"), value("bias"), float(value("eps"))
    if node.target in (F.layer_norm, torch.layer_norm):
        shape = value("normalized_shape")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) != 1:
            raise UnsupportedSource(f"layer_norm over {len(shape)} trailing axes {shape}: only one over the channel "
                                    f"axis has per-channel parameters that carry over")
        return SourceNorm("positional", shape[0], True, eps, weight, bias)
    if node.target is F.group_norm:
        if weight is None:
            raise UnsupportedSource("group_norm without weight: its channel count is not known before running it")
        return SourceNorm("group", weight.numel(), False, eps, weight, bias, num_groups=int(value("num_groups")))
    mean, var = value("running_mean"), value("running_var")
    known = next((t for t in (mean, weight) if isinstance(t, torch.Tensor)), None)
    if known is None:
        raise UnsupportedSource(f"{_NAMES[node.target]} without running statistics or weight: its channel count "
                                f"is not known before running it")
    if node.target is F.instance_norm:
        return SourceNorm("instance", known.numel(), False, eps, weight, bias, mean, var)
    return SourceNorm("batch", known.numel(), False, eps, weight, bias, mean, var,
                      momentum=value("momentum"), track_running_stats=mean is not None)


@dataclass
class _Owner:
    """An owner module's two graphs, edited in place as its functional sites are installed."""

    module: nn.Module
    graphs: dict[bool, fx.Graph]
    nodes: list[dict[bool, fx.Node]]  # per call, in order: its node in each graph


class FunctionalSite(Site):
    """A site whose install replaces a call node in the owner's forward by a child module."""

    owner_state: _Owner | None = None
    child: str = ""
    index: int = 0

    def install(self, model: nn.Module, new: nn.Module) -> None:
        state = self.owner_state
        state.module.add_module(self.child, new)
        for mode, graph in state.graphs.items():
            node = state.nodes[self.index][mode]
            with graph.inserting_before(node):
                call = graph.call_module(self.child, (node.args[0] if node.args else node.kwargs["input"],))
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            graph.lint()
        forward_rewrite.install(state.module, state.graphs[True], state.graphs[False])

    def restore(self, model: nn.Module) -> None:
        forward_rewrite.uninstall(self.owner_state.module)
        if self.child in self.owner_state.module._modules:
            delattr(self.owner_state.module, self.child)


def _probe_calls(owner: nn.Module, graph: fx.Graph, calls: list[fx.Node],
                 input_shapes: set[tuple[int, ...]]) -> dict[int, list[tuple]]:
    """(input shape, output shape) of each call in ``calls`` (by index), for every input shape the
    whole-model probe saw ``owner`` take: its eval graph interpreted on meta tensors."""
    index = {node: i for i, node in enumerate(calls)}
    seen: dict[int, list[tuple]] = {}

    class Recording(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in index:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                x = args[0] if args else kwargs["input"]
                seen.setdefault(index[node], []).append((tuple(x.shape), tuple(out.shape)))
            return out

    for shape in input_shapes:
        try:
            with preserved(owner), torch.no_grad(), on_meta(owner):
                owner.eval()
                Recording(owner, graph=graph).run(torch.empty(shape, device="meta"))
        except Exception:  # noqa: BLE001  (the call's shapes stay unknown: verify says so)
            continue
    return seen


def functional_sites(model: nn.Module, functional: list[dict],
                     probe: ProbeResult | None = None) -> tuple[list[Site], list[dict]]:
    """Sites for the functional norm calls ``analyze`` found (dicts naming the owner ``module``), and
    the calls that cannot be sites, each with its ``reason`` (the owner cannot be rewritten). With the
    whole-model ``probe``, each site gets the shapes its call saw, for convert's checks."""
    owners: dict[str, list[dict]] = {}
    for call in functional:
        owners.setdefault(call["module"], []).append(call)
    sites: list[Site] = []
    left: list[dict] = []
    for owner_name, calls in owners.items():
        owner = model.get_submodule(owner_name)
        children = frozenset(name for name, _ in owner.named_children())  # its own code only
        traced = {mode: trace(owner, train=mode, leaves_first=children) for mode in (True, False)}
        why = next((f"its module '{owner_name}' cannot be traced alone ({t.error})" for t in traced.values()
                    if not t.ok), None) or forward_rewrite.why_not_rewritable(owner)
        nodes = {} if why else {mode: [n for n in t.graph.nodes if n.op == "call_function"
                                       and n.target in FUNCTIONAL_NORMS] for mode, t in traced.items()}
        if not why and [n.target for n in nodes[True]] != [n.target for n in nodes[False]]:
            why = "its module's train and eval graphs make different functional norm calls"
        if why:
            left += [dict(c, reason=why) for c in calls]
            continue
        state = _Owner(owner, {m: t.graph for m, t in traced.items()},
                       [{True: a, False: b} for a, b in zip(nodes[True], nodes[False])])
        owner_inputs = {io[0] for io in (probe.shapes.get(OWNER_PREFIX + owner_name, []) if probe else [])}
        io_shapes = _probe_calls(owner, traced[False].graph, nodes[False], owner_inputs)
        counts: dict[str, int] = {}
        for index, node in enumerate(nodes[True]):
            function = _NAMES.get(node.target) or getattr(node.target, "__name__", str(node.target))
            counts[function] = counts.get(function, 0) + 1
            child = f"{function}_{counts[function] - 1}"
            while hasattr(owner, child):
                child += "_"
            where = owner_name or type(model).__name__
            if node.target not in _PARAMETERS:
                source, match = None, Match(unsupported=f"{function} in the forward of '{where}': no documented "
                                                        f"transfer rule for this function (left as it is)")
            else:
                try:
                    source = _read(owner, node)
                    match = Match(reader=lambda m: m.source, note=f"F.{function} call in the forward of '{where}' "
                                                                  f"(converted by a graph pass)")
                except UnsupportedSource as why_not:
                    source, match = None, Match(unsupported=str(why_not))
            stand_in = FunctionalNorm(f"F.{function}", where, source)
            stand_in.training = owner.training
            site = FunctionalSite(f"{owner_name}.{child}" if owner_name else child, stand_in, match, calls=1)
            site.owner_state, site.child, site.index = state, child, index
            site.io_shapes = io_shapes.get(index, [])
            sites.append(site)
    return sites, left
