"""Instance-level forward rewriting from FX graphs, keeping the module's class.

Some rewrites cannot be done by swapping modules: an activation module shared by several
call sites (torchvision ResNet's ``self.relu``) or a functional activation must be removed at
one call site only. The owning module's forward is then traced in train and in eval mode
(FX bakes ``self.training`` branches in), the graphs are edited, and the instance gets a
``forward`` attribute that runs the graph of its current mode. The class, its other methods
and every state_dict key are unchanged. Deep copies work; pickling the module does not (use
``normsurgeon.save``/``load``, which re-apply the conversion instead of pickling code).
"""
from __future__ import annotations

import copy
import inspect

from torch import fx, nn


def _compile(graph: fx.Graph):
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<normsurgeon rewritten forward>", "exec"), namespace)  # noqa: S102
    return namespace["forward"], code.src


class GraphForward:
    """Callable installed as ``owner.forward``: runs the train or eval graph by ``owner.training``."""

    def __init__(self, owner: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph):
        self.owner = owner
        self.graphs = {True: train_graph, False: eval_graph}  # by training flag; edit copies only
        (self._train, self.train_src), (self._eval, self.eval_src) = _compile(train_graph), _compile(eval_graph)

    def __call__(self, *args, **kwargs):
        fn = self._train if self.owner.training else self._eval
        return fn(self.owner, *args, **kwargs)

    def __deepcopy__(self, memo):
        new = object.__new__(GraphForward)
        memo[id(self)] = new
        new.__dict__.update(self.__dict__)  # compiled functions are stateless: shared
        new.owner = copy.deepcopy(self.owner, memo)
        return new

    def __reduce__(self):
        raise TypeError("a module whose forward normsurgeon rewrote cannot be pickled; save it with "
                        "normsurgeon.save(model, path) and rebuild it with normsurgeon.load(path, base_model)")


def install(owner: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph) -> None:
    """Replace ``owner``'s forward (on this instance only) by the two graphs."""
    owner.forward = GraphForward(owner, train_graph, eval_graph)


def uninstall(owner: nn.Module) -> None:
    """Back to the class's forward."""
    owner.__dict__.pop("forward", None)


def why_not_rewritable(owner: nn.Module) -> str | None:
    """A forward with more than one argument may be called with values FX did not trace with
    (``shortcut=None`` traced as a tensor placeholder bakes in the wrong branch)."""
    params = list(inspect.signature(owner.forward).parameters.values())
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        names = ", ".join(p.name for p in params)
        return f"its parent's forward({names}) takes more than one input, which FX cannot trace faithfully"
    return None
