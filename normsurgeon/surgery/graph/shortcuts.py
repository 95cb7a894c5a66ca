"""Shortcut norms: a norm on the short branch into a residual add (e.g. ResNet's downsample BN).

In the whole-model graph, each node's depth is the length of the longest path from an input.
A norm whose output (after ``nn.Identity`` modules) is an operand of an add whose other
operands are all deeper is on the shortcut: the add's other branch carries the block's main
path. Names play no part.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target in ("add", "add_"))


def find_shortcut_norms(graph: fx.Graph, modules: dict[str, nn.Module], names: set[str]) -> set[str]:
    """The subset of ``names`` (norm qualnames) that sit on a residual shortcut."""
    depth: dict[fx.Node, int] = {}
    for node in graph.nodes:
        depth[node] = 1 + max((depth[a] for a in node.all_input_nodes), default=0)
    found = set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        out = node
        while len(out.users) == 1 and next(iter(out.users)).op == "call_module" and \
                type(modules.get(next(iter(out.users)).target)) is nn.Identity:
            out = next(iter(out.users))
        for user in out.users:
            others = [a for a in user.all_input_nodes if a is not out]
            if _is_add(user) and others and all(depth[o] > depth[out] for o in others):
                found.add(node.target)
    return found


def shortcut_context(graphs) -> dict[str, bool]:
    """A target's ``context``: site name → whether it sits on a residual shortcut (nothing when the
    model cannot be traced). ``graphs`` is the conversion's ``GraphContext``."""
    graph = graphs.graph(train=True)
    if graph is None:
        return {}
    found = find_shortcut_norms(graph, graphs.modules, set(graphs.site_names))
    return {name: name in found for name in graphs.site_names}
