"""Pairing each norm with the elementwise activation that consumes its output (for PN-Act).

The owner of a norm is its parent, whose forward calls it. A norm pairs with an activation when
its output, after any ``nn.Identity`` modules, has exactly one consumer, that consumer is an
elementwise activation (``activations.py``) called in the owner's forward, and it is the same
in train and eval mode. The search reads the whole-model graphs of the conversion's shared
``GraphContext`` (no extra trace for the common case); an owner is traced alone, in both modes,
only when its graph is needed: its forward must be rewritten, or the norm is not in the
whole-model graph (inside a module FX could not trace). How the activation is then taken out of
the data path ("removal"):
  swap     the activation module is used at this call site only: it becomes ``nn.Identity``
  rewrite  a shared module, a function or the swish pattern: the owner's forward is rewritten
           (``forward_rewrite.py``) with that call site's activation nodes removed
Anything else (an add, several consumers, a non-elementwise op) is not paired, with the reason.
"""
from __future__ import annotations

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


def _in_scope(node: fx.Node, owner: str | None) -> bool:
    """Whether ``node`` runs in ``owner``'s forward (or below it); any node when ``owner`` is None
    (the graph is the owner's own)."""
    if owner is None or owner == "":
        return node.op != "output" or owner is None
    return any(path == owner for path, _ in (node.meta.get("nn_module_stack") or {}).values())


def _find(graph: fx.Graph, modules: dict[str, nn.Module], name: str, owner: str | None = None) -> _Found:
    """The activation after the norm called as ``name`` in ``graph``: the owner's own graph
    (``owner`` None), or the whole model's, read within ``owner``'s forward."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        return _Found(None, reason=f"called {len(calls)} times in its parent's forward")
    out = calls[0]
    while len(out.users) == 1:
        (user,) = out.users
        if user.op == "call_module" and type(modules.get(user.target)) is nn.Identity and _in_scope(user, owner):
            out = user
        else:
            break
    users = list(out.users)
    outside = [u for u in users if not _in_scope(u, owner)]
    if len(users) == 1 and not outside:
        act = activation_of(users[0], modules, out)
        if act is not None:
            return _Found(act, [users[0]], out)
    swish = swish_pattern(out)
    if swish is not None and all(_in_scope(n, owner) for n in swish[1]):
        return _Found(swish[0], swish[1], out)
    if not users:
        return _Found(None, reason="its output is not used in its parent's forward")
    if outside and len(users) == 1:
        return _Found(None, reason="it is the output of its parent's forward (what follows is not visible there)")
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


def activation_context(graphs) -> dict:
    """A target's ``context``: site name → ``Pairing`` (``graphs``: the conversion's ``GraphContext``)."""
    return pairings_and_plans(graphs)[0]


def pairings_and_plans(graphs) -> tuple[dict, dict]:
    """(pairings, per-owner rewrite plans) for the readable sites, computed once per conversion."""
    return graphs.cached("pairings", lambda: find_pairings(graphs.model, graphs.site_names, graphs))


def find_pairings(model: nn.Module, site_names: list[str], graphs=None) -> tuple[dict[str, Pairing], dict]:
    """Pairings for ``site_names`` (qualnames of norm modules) and the per-owner edit plans.

    With ``graphs`` (a ``GraphContext``) the whole-model graphs are read first and an owner is
    traced only when its own graph is needed; without, every owner is traced in both modes."""
    registrations: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        registrations[id(m)] = registrations.get(id(m), 0) + 1
    pairings: dict[str, Pairing] = {}
    by_owner: dict[str, list[str]] = {}
    whole = {mode: graphs.graph(train=mode) for mode in (True, False)} if graphs is not None else {}
    for name in site_names:
        owner_name = _owner_of(model, name)[0]
        if whole and all(g is not None for g in whole.values()):
            found = {mode: _find(g, graphs.modules, name, owner_name) for mode, g in whole.items()}
            pairing = _pairing(found, whole[True], graphs.modules, owner_name, name, registrations, relative=True)
            if pairing is not None and pairing.removal != "rewrite":
                pairings[name] = pairing
                continue
            reason = found[True].reason or found[False].reason
            if pairing is None and not reason.startswith("called 0 times"):  # (0: inside an untraceable module)
                pairings[name] = Pairing(reason=reason, owner=owner_name)
                continue
        by_owner.setdefault(owner_name, []).append(name)

    plans = {}
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
        rewrite = {}
        for name in names:
            found = {mode: _find(t.graph, modules, _owner_of(model, name)[1]) for mode, t in traced.items()}
            pairing = _pairing(found, traced[True].graph, modules, owner_name, name, registrations)
            if pairing is None:
                pairings[name] = Pairing(reason=found[True].reason or found[False].reason, owner=owner_name)
                continue
            pairings[name] = pairing
            if pairing.removal == "rewrite":
                why_not = forward_rewrite.why_not_rewritable(owner)
                if why_not:
                    pairings[name] = Pairing(reason=f"removing its activation needs a forward rewrite, "
                                                    f"but {why_not}", owner=owner_name)
                    continue
                rewrite[name] = found
        if rewrite:
            plans[owner_name] = {"graphs": {m: t.graph for m, t in traced.items()}, "sites": rewrite}
    return pairings, plans


def _pairing(found: dict, train_graph: fx.Graph, modules: dict[str, nn.Module], owner_name: str, name: str,
             registrations: dict[int, int], relative: bool = False) -> Pairing | None:
    """The Pairing for one site from what was found in each mode; None when there is none (the
    reason is in ``found``). ``relative``: node targets are whole-model qualnames."""
    train, evaluation = found[True], found[False]
    if train.activation is None or evaluation.activation is None:
        return None
    if type(train.activation) is not type(evaluation.activation):
        return Pairing(reason="train and eval graphs apply different activations", owner=owner_name)
    node = train.nodes[0]
    prefix = f"{owner_name}." if owner_name else ""
    if node.op == "call_module":
        module = modules[node.target]
        local = node.target[len(prefix):] if relative else node.target
        calls = sum(1 for n in train_graph.nodes if n.op == "call_module" and n.target == node.target)
        shared = calls > 1 or registrations.get(id(module), 0) > 1 or (relative and not node.target.startswith(prefix))
        what = (f"its parent's shared module '{local}' (parent forward rewritten)" if shared
                else f"module '{local}' of its parent (now Identity)")
        return Pairing(train.activation, owner=owner_name, removal="rewrite" if shared else "swap",
                       act_name=prefix + local, describe=what)
    kind = "swish pattern x*sigmoid(x)" if len(train.nodes) == 2 else _describe(node)
    return Pairing(train.activation, owner=owner_name, removal="rewrite",
                   describe=f"{kind} in its parent's forward (rewritten)")


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
