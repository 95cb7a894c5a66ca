"""The conv that produces each norm's input (for Cross-Iteration BN), found in the traced graph.

A norm's producer is the module called on the norm's input, after skipping ``nn.Identity``
modules. It qualifies when it is a Conv2d whose weight alone determines its output statistics
(``layers._conv_statistics.supported_conv``: plain ``nn.Conv2d`` of any stride, padding mode,
dilation and groups, with or without bias, and timm's ``Conv2dSame``), called once in the
forward (a shared conv would hand its input of another call to the norm), and the same at every
call of the norm. Anything else (an add, a pool, a concat, a Linear, weight-standardized
convs) comes back as the reason instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ...layers._conv_statistics import supported_conv


@dataclass
class Producer:
    """The conv whose output a norm normalizes."""

    name: str
    conv: nn.Conv2d


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"the output of module '{node.target}' ({type(modules.get(node.target)).__name__})"
    if node.op in ("call_function", "call_method"):
        return f"the result of {getattr(node.target, '__name__', node.target)}()"
    if node.op == "placeholder":
        return "an input of the model"
    return f"a {node.op} node"


def find_producers(graph: fx.Graph | None, modules: dict[str, nn.Module],
                   names: list[str]) -> dict[str, Producer | str]:
    """Site qualname → its producing conv, or the reason it has none usable by CBN."""
    if graph is None:
        return {n: "the model could not be traced, so the conv producing its input is unknown" for n in names}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    found: dict[str, list[Producer | str]] = {}
    wanted = set(names)
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        while source is not None and source.op == "call_module" and \
                type(modules.get(source.target)) is nn.Identity and isinstance(source.args[0], fx.Node):
            source = source.args[0]
        if source is None:
            result: Producer | str = "its input is not a tensor computed in the traced graph"
        elif source.op != "call_module" or not isinstance(modules.get(source.target), nn.Conv2d):
            result = f"its input is {_describe(source, modules)}, not a Conv2d's output"
        else:
            conv = modules[source.target]
            why = supported_conv(conv)
            if why:
                result = why
            elif calls.get(source.target, 0) != 1:
                result = (f"its conv '{source.target}' is called {calls[source.target]} times in the forward "
                          f"(shared weights): which call feeds the norm is ambiguous at run time")
            else:
                result = Producer(source.target, conv)
        found.setdefault(node.target, []).append(result)
    out: dict[str, Producer | str] = {}
    for name in names:
        results = found.get(name)
        if not results:
            out[name] = "it is not called in the traced graph (inside a leaf module, or unused)"
        elif len({r.name if isinstance(r, Producer) else r for r in results}) > 1:
            out[name] = f"it is called {len(results)} times with different inputs"
        else:
            out[name] = results[0]
    return out


def producer_context(graphs) -> dict[str, Producer | str]:
    """A target's ``context``: site name → its producing conv, or why it has none usable
    (``graphs`` is the conversion's ``GraphContext``)."""
    return find_producers(graphs.graph(train=True), graphs.modules, graphs.site_names)
