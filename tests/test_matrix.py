"""The conversion matrix: every architecture × every standard target.

For each pair: no source norm is left unless the report says why, a train-mode forward and
backward are finite, and an eval-mode forward is finite. Norm statistics and affines are
randomized first, so the transfer rules are exercised on non-trivial values.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

import normsurgeon as ns
from normsurgeon import layers
from normsurgeon.surgery.sources import match_source

from architectures import ARCHITECTURES
from conftest import randomize_norms

TARGETS = ["bn", "frozen_bn", "gn", "ln", "in", "pn", "proxy_gn", "proxy_ln", "bgn", "iebn", "cbn", "mbn"]
OPTIONS = {"bgn": {"num_groups": "auto", "batch_size": 2}}
OURS = (layers.BatchNorm, layers.FrozenBatchNorm, layers.GroupNorm, layers.InstanceNorm,
        layers.PositionalNorm, layers.ProxyNormAct, layers.BatchGroupNorm,
        layers.InstanceEnhancementBatchNorm, layers.CrossIterationBatchNorm, layers.MemorizedBatchNorm)


@functools.lru_cache(maxsize=4)
def build(arch_id: str):
    builder, size = {a: (b, s) for a, b, s in ARCHITECTURES}[arch_id]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = builder()
    return randomize_norms(model).eval(), size


def total(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, dict):
        return sum(total(v) for v in out.values())
    return sum(total(v) for v in out if v is not None)


def all_finite(out) -> bool:
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out).all())
    values = out.values() if isinstance(out, dict) else [v for v in out if v is not None]
    return all(all_finite(v) for v in values)


def test_matrix_covers_the_required_families():
    ids = [a for a, _, _ in ARCHITECTURES]
    assert sum(i.startswith("timm_") for i in ids) >= 20 and sum(i.startswith("tv_") for i in ids) >= 10


def _pairs():
    """Every (architecture, target). The default run takes one target per architecture, rotating, so every
    architecture and every target is converted in it; `make test-slow` runs the other pairs."""
    for i, (arch, _, _) in enumerate(ARCHITECTURES):
        for j, to in enumerate(TARGETS):
            default = j == i % len(TARGETS)
            yield pytest.param(arch, to, id=f"{arch}-{to}", marks=() if default else pytest.mark.slow)


def test_the_default_run_covers_every_architecture_and_target():
    default = [p.values for p in _pairs() if not p.marks]
    assert {a for a, _ in default} == {a for a, _, _ in ARCHITECTURES} and {t for _, t in default} == set(TARGETS)


@pytest.mark.parametrize("arch, to", list(_pairs()))
def test_convert_architecture(arch, to):
    model, size = build(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = ns.convert(model, to=to, input_size=(3, size, size), **OPTIONS.get(to, {}))
    report = new.normsurgeon_report

    explained = {n for r in report.rows if r.status in ("skipped", "unsupported")
                 for n in [r.name] + r.aliases}
    left = {name for name, m in new.named_modules()
            if match_source(m).is_site and not isinstance(m, OURS)
            and not any(name.startswith(e + ".") for e in explained)}
    assert left <= explained, f"norms left without a reason: {sorted(left - explained)[:5]}"
    for row in report.converted:
        assert isinstance(new.get_submodule(row.name), OURS)
    assert report.converted or all(r.reason for r in report.rows), "nothing converted, no reason given"

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    new.train()
    out = new(x)
    assert all_finite(out), "train-mode forward is not finite"
    total(out).backward()
    grads = [p.grad for p in new.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), "backward is not finite"
    if ns.needs_step_hooks(new):  # stateful targets: a step, the hook, and a forward that uses the state
        with torch.no_grad():
            for p in new.parameters():
                if p.grad is not None:  # sign step: batch-2 gradients here can be ~1e10
                    p.sub_(1e-3 * p.grad.sign())
        ns.after_step(new, x)
        out = new(x)
        assert all_finite(out), "train-mode forward after a step is not finite"
        total(out).backward()
    new.eval()
    with torch.no_grad():
        assert all_finite(new(x)), "eval-mode forward is not finite"
