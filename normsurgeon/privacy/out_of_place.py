"""Make the in-place ops that break Opacus's per-sample hooks out of place.

Opacus hooks every layer with trainable parameters (``register_full_backward_hook``). The
hook hands the layer's output on as a view made by a custom autograd Function, and torch
forbids modifying such a view in place ("Output 0 of BackwardHookFunction is a view and is
being modified inplace"): torchvision's ``ReLU(inplace=True)`` after a norm and its
``out += identity`` after the last norm of a block both fail (Opacus issue #828; Opacus's own
``ModuleValidator.fix(resnet18)`` has it too).

``make_out_of_place`` sets ``inplace=False`` on every module that has the flag, then runs the
model once on meta tensors (no compute) with such hooks on its trainable layers. An op that
still fails is located in the module whose forward runs it; every module of that class gets
its forward traced (train and eval graphs) and rewritten on the instance with out-of-place
ops (``forward_rewrite``: same class, methods and state_dict keys). FX records ``a += b`` as
``a + b`` already; ``x.relu_()``, ``torch.relu_(x)`` and ``inplace=True`` arguments are
replaced by their out-of-place forms, whose result later users of the mutated value then read.
Repeat until the probe passes. (A view of the mutated value taken before the op would still
see the old value; FX's own record of ``a += b`` has the same limit.)
"""
from __future__ import annotations

import linecache
import operator
import os
import traceback

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..model_state import preserved
from ..surgery.graph import forward_rewrite
from ..surgery.graph.probe import on_meta
from ..surgery.graph.tracing import failure_location, trace
from .errors import NotDPReady

_OUT_OF_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                           operator.imul: operator.mul, operator.itruediv: operator.truediv,
                           operator.ifloordiv: operator.floordiv, operator.ipow: operator.pow,
                           operator.iand: operator.and_, operator.ior: operator.or_}
_MAX_ROUNDS = 64


class InplaceOpError(NotDPReady):
    """An in-place op that breaks per-sample hooks and could not be made out of place."""


def _out_of_place_target(node: fx.Node):
    """The out-of-place replacement of ``node``'s target, or None if it is not in place."""
    target = node.target
    if node.op == "call_method" and target.endswith("_") and not target.endswith("__") \
            and hasattr(torch.Tensor, target[:-1]):
        return target[:-1]
    if node.op == "call_function":
        if target in _OUT_OF_PLACE_OPERATORS:
            return _OUT_OF_PLACE_OPERATORS[target]
        name = getattr(target, "__name__", "")
        for namespace in (torch, F):
            if name.endswith("_") and getattr(namespace, name, None) is target \
                    and hasattr(namespace, name[:-1]):
                return getattr(namespace, name[:-1])
    return None


def _edit(graph: fx.Graph) -> int:
    """Make ``graph``'s in-place ops out of place; how many were changed. An in-place op
    mutated its first argument, so later users of that argument read the op's result instead
    (``out.relu_(); return out + x`` → ``r = out.relu(); return r + x``)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    changed = 0
    for node in list(graph.nodes):
        replacement = _out_of_place_target(node)
        inplace_kwarg = node.op == "call_function" and node.kwargs.get("inplace") is True
        if replacement is None and not inplace_kwarg:
            continue
        if replacement is not None:
            node.target = replacement
        if inplace_kwarg:
            node.kwargs = {**node.kwargs, "inplace": False}
        mutated = node.args[0] if node.args else None
        if isinstance(mutated, fx.Node):
            mutated.replace_all_uses_with(node, delete_user_cb=lambda user, op=node: order[user] > order[op])
        changed += 1
    graph.lint()
    return changed


def _rewrite(owner: nn.Module, where: str) -> None:
    """Install an out-of-place forward on ``owner`` (its existing rewrite, or a fresh trace)."""
    current = owner.__dict__.get("forward")
    if isinstance(current, forward_rewrite.GraphForward):
        graphs = {mode: _copy(graph) for mode, graph in current.graphs.items()}
        if not sum(_edit(g) for g in graphs.values()):
            raise InplaceOpError(f"{where}: its rewritten forward has an in-place op normsurgeon "
                                 f"cannot replace")
    else:
        why = forward_rewrite.why_not_rewritable(owner)
        if why:
            why = why.replace("its parent's ", "its ")
            raise InplaceOpError(f"{where}: cannot rewrite it, {why}")
        traced = {mode: trace(owner, train=mode) for mode in (True, False)}  # (trace keeps every flag)
        failed = next((t for t in traced.values() if not t.ok), None)
        if failed is not None:
            raise InplaceOpError(f"{where}: its forward cannot be traced ({failed.error})")
        graphs = {mode: t.graph for mode, t in traced.items()}
        for graph in graphs.values():
            _edit(graph)
    forward_rewrite.install(owner, graphs[True], graphs[False])


def _copy(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    output = new.graph_copy(graph, {})
    new.output(output)
    return new


def _probe(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module | None, str | None]:
    """(module, where) for the first in-place op on a hooked layer's output, or (None, None).
    A model that cannot run on meta tensors gives (None, why)."""
    hooked = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    handles = [m.register_full_backward_hook(lambda *_: None) for m in hooked]
    try:
        with preserved(model), torch.enable_grad(), on_meta(model):
            model.train()
            model(example.to("meta"))
        return None, None
    except Exception as exc:  # noqa: BLE001  (reported to the caller)
        if isinstance(exc, RuntimeError) and "modified inplace" in str(exc):
            found = _module_running(exc, model)
            if found is not None:
                return found
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{type(exc).__name__}: {first} at {failure_location(exc)}"
    finally:
        for h in handles:
            h.remove()


def _module_running(exc: BaseException, model: nn.Module) -> tuple[nn.Module, str] | None:
    """The innermost module of ``model`` whose own code raised ``exc``, and 'file:line: code'."""
    ours = {id(m) for m in model.modules()}
    for frame, line in reversed(list(traceback.walk_tb(exc.__traceback__))):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in ours and frame.f_code.co_name != "_call_impl":
            path = frame.f_code.co_filename
            code = linecache.getline(path, line).strip()
            return owner, f"{os.path.basename(path)}:{line}" + (f": `{code}`" if code else "")
    return None


def make_out_of_place(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Make ``model``'s hook-breaking in-place ops out of place (in place on ``model``).

    Returns what was changed, one line per kind. Raises ``InplaceOpError`` naming the module
    and the line when an op cannot be made out of place; a model that cannot run on meta
    tensors is left with only its ``inplace`` flags changed, and the reason is returned.
    """
    saved = [(m, m.__dict__.get("forward"), getattr(m, "inplace", None)) for m in model.modules()]
    try:
        return _make_out_of_place(model, example)
    except InplaceOpError:
        for m, forward, inplace in saved:  # a failure changes nothing
            forward_rewrite.uninstall(m)
            if forward is not None:
                m.forward = forward
            if inplace is not None:
                m.inplace = inplace
        raise


def _make_out_of_place(model: nn.Module, example: torch.Tensor) -> list[str]:
    names = {id(m): n or type(model).__name__ for n, m in model.named_modules()}
    flagged = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for m in flagged:
        m.inplace = False
    changes = [f"inplace=False on {len(flagged)} module(s)"] if flagged else []
    rewritten: set[type] = set()
    for _ in range(_MAX_ROUNDS):
        module, where = _probe(model, example)
        if module is None:
            if where:
                changes.append(f"not checked for other in-place ops: the model does not run on meta "
                               f"tensors ({where})")
            return changes
        name = names[id(module)]
        cls = type(module)
        if cls in rewritten or getattr(module, "inplace", None) is not None:
            raise InplaceOpError(
                f"'{name}' ({cls.__name__}) modifies a hooked layer's output in place at {where} and "
                f"normsurgeon could not make it out of place: edit that line (e.g. `out = out + "
                f"identity` for `out += identity`).")
        same = [m for m in model.modules() if type(m) is cls]
        for m in same:
            _rewrite(m, f"'{names[id(m)]}' ({cls.__name__}, in-place op at {where})")
        rewritten.add(cls)
        changes.append(f"forward of {len(same)} {cls.__name__} module(s) rewritten out of place "
                       f"(in-place op at {where})")
    raise InplaceOpError(f"more than {_MAX_ROUNDS} module classes with in-place ops; giving up")
