"""Routing batches to domains in a model with domain-specific BatchNorm (``to="dsbn"``).

    with normsurgeon.domain(model, "photo"):      # the whole batch is from one domain
        loss = criterion(model(x), y)
    with normsurgeon.domain(model, idx):          # mixed batch: idx (N,) long, or a list of names
        loss = criterion(model(x), y)

A training loop that gets (input, label, domain) batches routes each with one call, around
forward, backward, ``optimizer.step()`` and ``normsurgeon.after_step``. Contexts nest: on exit
the previous routing comes back. ``set_domain`` routes until changed (deployment on a known
domain); ``set_domain(model, None)`` clears it.
"""
from __future__ import annotations

import contextlib

from torch import nn

from ..layers.domain_batch_norm import DomainSpecificBatchNorm, resolve_route


def domain_layers(model: nn.Module) -> list[tuple[str, DomainSpecificBatchNorm]]:
    """(name, layer) of every domain-specific BatchNorm in ``model``, each layer once."""
    seen, found = set(), []
    for name, m in model.named_modules():
        if isinstance(m, DomainSpecificBatchNorm) and id(m) not in seen:
            seen.add(id(m))
            found.append((name, m))
    return found


def _layers_or_raise(model: nn.Module, what: str) -> list[DomainSpecificBatchNorm]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes a model (nn.Module), got {type(model).__name__}")
    layers = [m for _, m in domain_layers(model)]
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no domain-specific BatchNorm layer. Convert it "
                         f"first: model = normsurgeon.convert(model, to='dsbn', domains=['a', 'b', ...])")
    return layers


def domains_of(model: nn.Module) -> tuple[str, ...]:
    """The domain names of ``model``'s dsbn layers (the same in every layer, else ValueError)."""
    layers = _layers_or_raise(model, "domains_of")
    names = {layer.domains for layer in layers}
    if len(names) > 1:
        raise ValueError(f"the dsbn layers of this model disagree on their domains: {sorted(names)}")
    return layers[0].domains


def _route_all(layers, d):
    """Resolve ``d`` once per distinct domain list (names/indices are checked before any change)."""
    if d is None:
        return [None] * len(layers)
    cache = {}
    routes = []
    for layer in layers:
        if layer.domains not in cache:
            cache[layer.domains] = resolve_route(layer.domains, d, where="the model's dsbn layers")
        routes.append(cache[layer.domains])
    return routes


def set_domain(model: nn.Module, d) -> None:
    """Route every later forward of ``model`` to domain ``d`` (name, index, or (N,) per-sample
    indices); ``None`` clears the routing (a forward then raises)."""
    layers = _layers_or_raise(model, "set_domain")
    for layer, route in zip(layers, _route_all(layers, d)):
        layer.route = route


@contextlib.contextmanager
def domain(model: nn.Module, d):
    """Route ``model``'s forwards inside the block to domain ``d``: a name, an index, or per-sample
    indices (a (N,) integer tensor or a list of names/indices) for a mixed batch.

    Raises ValueError for an unknown name, an index out of range, or a model without dsbn layers.
    """
    layers = _layers_or_raise(model, "normsurgeon.domain")
    routes = _route_all(layers, d)
    previous = [layer.route for layer in layers]
    for layer, route in zip(layers, routes):
        layer.route = route
    try:
        yield model
    finally:
        for layer, route in zip(layers, previous):
            layer.route = route


def router(model: nn.Module):
    """``route(d)``: a context routing ``model``'s domain-specific BNs to domain ``d`` for a batch
    (a no-op when ``d`` is None or the model has no dsbn layer), for loops over (x, y, domain)."""
    if not domain_layers(model):
        return lambda d: contextlib.nullcontext()
    return lambda d: domain(model, d) if d is not None else contextlib.nullcontext()
