"""Recognizing elementwise activations in a traced graph, as modules φ usable on a proxy grid.

A node is an elementwise activation if it is a call of
- a module whose class is a torch.nn activation that acts on each element independently (per
  channel parameters allowed: PReLU), or any activation class of ``timm.layers.activations*``;
- a function of that kind (``F.relu``, ``torch.sigmoid``, timm's ``swish``, ...), or the
  tensor methods ``.relu()``, ``.sigmoid()``, ``.tanh()`` (and in-place variants);
- the swish pattern ``y * sigmoid(y)`` (two nodes; ``y`` feeds both).
``activation_of`` returns a module computing the same φ (never in place) or None.
"""
from __future__ import annotations

import functools
import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU,
    nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.PReLU, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold)

_FUNCTIONS = {F.relu, F.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.hardtanh,
              F.leaky_relu, F.elu, F.celu, F.selu, F.mish, F.softplus, F.sigmoid, F.tanh,
              F.softsign, F.tanhshrink, F.logsigmoid, torch.relu, torch.relu_, torch.sigmoid,
              torch.tanh, torch.selu}
_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_SIGMOIDS = {torch.sigmoid, F.sigmoid}


def _timm_activation_modules() -> tuple[type, ...]:
    import timm.layers.activations as a
    import timm.layers.activations_me as me
    return tuple(c for mod in (a, me) for c in vars(mod).values()
                 if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == mod.__name__)


def _timm_activation_functions() -> set:
    import timm.layers.activations as a
    import timm.layers.activations_me as me
    return {f for mod in (a, me) for name, f in vars(mod).items()
            if callable(f) and not isinstance(f, type) and getattr(f, "__module__", None) == mod.__name__
            and not name.startswith("_")}


@functools.lru_cache(maxsize=1)
def _registries() -> tuple[tuple[type, ...], set]:
    return ELEMENTWISE_MODULES + _timm_activation_modules(), _FUNCTIONS | _timm_activation_functions()


def elementwise_module_types() -> tuple[type, ...]:
    """Module classes recognized as elementwise activations (torch.nn's and timm's)."""
    return _registries()[0]


class ElementwiseFunction(nn.Module):
    """φ given as a function call from a graph: ``fn(x, *args, **kwargs)``, never in place."""

    def __init__(self, fn, args: tuple = (), kwargs: dict | None = None):
        super().__init__()
        self.fn, self.args = fn, tuple(args)
        self.kwargs = {k: v for k, v in (kwargs or {}).items() if k != "inplace"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _constant(arg) -> bool:
    return not isinstance(arg, fx.Node)


def activation_of(node: fx.Node, modules: dict[str, nn.Module], source: fx.Node) -> nn.Module | None:
    """The elementwise activation ``node`` applies to ``source`` (its first argument), or None."""
    module_types, functions = _registries()
    if not node.args or node.args[0] is not source:
        return None
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if not all(_constant(a) for a in list(rest) + list(kwargs.values())):
        return None
    if node.op == "call_module":
        module = modules.get(node.target)
        return module if isinstance(module, module_types) and not rest and not kwargs else None
    if node.op == "call_function" and node.target in functions:
        return ElementwiseFunction(node.target, rest, kwargs)
    if node.op == "call_method" and node.target in _METHODS and not rest:
        return ElementwiseFunction(getattr(torch, node.target.rstrip("_")))
    return None


def swish_pattern(source: fx.Node) -> tuple[nn.Module, list[fx.Node]] | None:
    """``source * sigmoid(source)`` (either order): (SiLU, [sigmoid node, mul node]) or None."""
    users = list(source.users)
    if len(users) != 2:
        return None
    sig = next((u for u in users if (u.op == "call_function" and u.target in _SIGMOIDS)
                or (u.op == "call_method" and u.target == "sigmoid")), None)
    mul = next((u for u in users if u is not sig and u.op == "call_function"
                and u.target in (operator.mul, torch.mul)), None)
    if sig is None or mul is None or list(sig.users) != [mul] or set(mul.args) != {source, sig}:
        return None
    return nn.SiLU(), [sig, mul]
