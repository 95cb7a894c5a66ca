"""Pairing each norm with the elementwise activation that consumes its output (for PN-Act).

Per owner module (the parent of the norm, whose forward calls it), the owner's forward is
traced alone, in train and in eval mode. A norm pairs with an activation when its output,
after any ``nn.Identity`` modules, has exactly one consumer and that consumer is an
elementwise activation (``activations.py``), the same in both modes. How the activation is
then taken out of the data path ("removal"):
  swap     the activation module is used at this call site only: it becomes ``nn.Identity``
  rewrite  a shared module, a function or the swish pattern: the owner's forward is rewritten
           (``forward_rewrite.py``) with that call site's activation nodes removed
Anything else (an add, several consumers, a non-elementwise op) is not paired, with the reason.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import fx, nn

from . import forward_rewrite
from .activations import activation_of, swish_pattern
from .tracing import trace


@dataclass
class Pairing:
    """The activation φ after a norm (or why there is none) and how to remove it."""

    activation: nn.Module | None = None
    reason: str | None = None
    owner: str = ""
    removal: str | None = None  # "swap" | "rewrite"
    act_name: str | None = None  # qualname of the activation module (swap, or a shared module)
    describe: str = ""

    @property
    def paired(self) -> bool:
        return self.activation is not None


@dataclass
class _Found:
    activation: nn.Module | None
    nodes: list[fx.Node] = field(default_factory=list)
    output: fx.Node | None = None  # the value the activation was applied to
    reason: str | None = None


def _describe(node: fx.Node) -> str:
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "output":
        return "the output of its parent's forward (what follows is not visible there)"
    return node.op


def _find(graph: fx.Graph, modules: dict[str, nn.Module], local_name: str) -> _Found:
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == local_name]
    if len(calls) != 1:
        return _Found(None, reason=f"called {len(calls)} times in its parent's forward")
    out = calls[0]
    while len(out.users) == 1:
        (user,) = out.users
        if user.op == "call_module" and type(modules.get(user.target)) is nn.Identity:
            out = user
        else:
            break
    users = list(out.users)
    if len(users) == 1:
        act = activation_of(users[0], modules, out)
        if act is not None:
            return _Found(act, [users[0]], out)
    swish = swish_pattern(out)
    if swish is not None:
        return _Found(swish[0], swish[1], out)
    if not users:
        return _Found(None, reason="its output is not used in its parent's forward")
    if len(users) > 1:
        return _Found(None, reason=f"its output has {len(users)} consumers "
                                   f"({', '.join(_describe(u) for u in users)})")
    if users[0].op == "output":
        return _Found(None, reason=f"it is {_describe(users[0])}")
    return _Found(None, reason=f"its output feeds {_describe(users[0])}, not an elementwise activation")


def _owner_of(model: nn.Module, name: str) -> tuple[str, str]:
    """(owner qualname, path of the norm relative to it): the nearest ancestor with a forward
    of its own (ModuleList / ModuleDict have none; their parent calls the norm)."""
    parent, _, child = name.rpartition(".")
    while parent and isinstance(model.get_submodule(parent), (nn.ModuleList, nn.ModuleDict)):
        parent, _, step = parent.rpartition(".")
        child = f"{step}.{child}"
    return parent, child


def _why_not_rewritable(owner: nn.Module) -> str | None:
    """A forward with more than one argument may be called with values FX did not trace with
    (``shortcut=None`` traced as a tensor placeholder bakes in the wrong branch)."""
    params = list(inspect.signature(owner.forward).parameters.values())
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        names = ", ".join(p.name for p in params)
        return f"its parent's forward({names}) takes more than one input, which FX cannot trace faithfully"
    return None


def find_pairings(model: nn.Module, site_names: list[str]) -> tuple[dict[str, Pairing], dict]:
    """Pairings for ``site_names`` (qualnames of norm modules) and the per-owner edit plans."""
    by_owner: dict[str, list[str]] = {}
    for name in site_names:
        by_owner.setdefault(_owner_of(model, name)[0], []).append(name)
    registrations: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        registrations[id(m)] = registrations.get(id(m), 0) + 1

    pairings, plans = {}, {}
    for owner_name, names in by_owner.items():
        owner = model.get_submodule(owner_name)
        traced = {mode: trace(owner, train=mode) for mode in (True, False)}
        failed = next((t for t in traced.values() if not t.ok), None)
        if failed is not None:
            for name in names:
                pairings[name] = Pairing(reason=f"its parent '{owner_name or type(model).__name__}' "
                                                f"cannot be traced ({failed.error})", owner=owner_name)
            continue
        modules = dict(owner.named_modules())
        found = {mode: {n: _find(t.graph, modules, _owner_of(model, n)[1]) for n in names}
                 for mode, t in traced.items()}
        rewrite = {}
        for name in names:
            train, evaluation = found[True][name], found[False][name]
            if train.activation is None or evaluation.activation is None:
                pairings[name] = Pairing(reason=train.reason or evaluation.reason, owner=owner_name)
                continue
            if type(train.activation) is not type(evaluation.activation):
                pairings[name] = Pairing(reason="train and eval graphs apply different activations",
                                         owner=owner_name)
                continue
            node = train.nodes[0]
            prefix = f"{owner_name}." if owner_name else ""
            if node.op == "call_module":
                module = modules[node.target]
                calls = sum(1 for n in traced[True].graph.nodes if n.op == "call_module" and n.target == node.target)
                shared = calls > 1 or registrations.get(id(module), 0) > 1
                removal = "rewrite" if shared else "swap"
                what = (f"its parent's shared module '{node.target}' (parent forward rewritten)" if shared
                        else f"module '{node.target}' of its parent (now Identity)")
                pairings[name] = Pairing(train.activation, owner=owner_name, removal=removal,
                                         act_name=prefix + node.target, describe=what)
            else:
                kind = "swish pattern x*sigmoid(x)" if len(train.nodes) == 2 else _describe(node)
                pairings[name] = Pairing(train.activation, owner=owner_name, removal="rewrite",
                                         describe=f"{kind} in its parent's forward (rewritten)")
            if pairings[name].removal == "rewrite":
                why_not = _why_not_rewritable(owner)
                if why_not:
                    pairings[name] = Pairing(reason=f"removing its activation needs a forward rewrite, "
                                                    f"but {why_not}", owner=owner_name)
                    continue
                rewrite[name] = (train, evaluation)
        if rewrite:
            plans[owner_name] = {"graphs": {m: t.graph for m, t in traced.items()},
                                 "sites": {n: {True: r[0], False: r[1]} for n, r in rewrite.items()}}
    return pairings, plans


def apply_plan(owner: nn.Module, plan: dict, keep: set[str]) -> None:
    """Remove the activation nodes of the sites in ``keep`` from both graphs and install them."""
    graphs = plan["graphs"]
    for name, per_mode in plan["sites"].items():
        if name not in keep:
            continue
        for mode, found in per_mode.items():
            for node in reversed(found.nodes):  # swish: mul first, then sigmoid
                node.replace_all_uses_with(found.output)
                graphs[mode].erase_node(node)
    for graph in graphs.values():
        graph.lint()
    forward_rewrite.install(owner, graphs[True], graphs[False])
