"""PN-Act's proxy moments at inference: computed once in eval mode with frozen parameters, recomputed
whenever a parameter, a buffer or the mode changes, and never cached in traced or exported graphs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normsurgeon.layers import ProxyNormAct

C = 6


def layer(act: nn.Module | None = None, seed: int = 0) -> ProxyNormAct:
    gen = torch.Generator().manual_seed(seed)
    m = ProxyNormAct(C, 2, act if act is not None else nn.SiLU())
    with torch.no_grad():
        for p in (m.weight, m.bias, m.proxy_weight, m.proxy_bias):
            p.copy_(torch.randn(C, generator=gen) * 0.3 + (1.0 if p is m.weight else 0.0))
    return m


def counted(m: ProxyNormAct) -> list[int]:
    """Count the moment computations of ``m`` (an instance-level wrapper)."""
    calls = [0]
    compute = m._compute_proxy_moments

    def wrapped():
        calls[0] += 1
        return compute()
    m._compute_proxy_moments = wrapped
    return calls


def reference(m: ProxyNormAct, x: torch.Tensor) -> torch.Tensor:
    """The same layer in training mode (never cached; train = eval for Proxy Norm)."""
    twin = copy.deepcopy(m).train()
    with torch.no_grad():
        return twin(x)


X = torch.randn(3, C, 5, 5, generator=torch.Generator().manual_seed(1))


def test_eval_no_grad_computes_once_and_matches():
    m = layer().eval()
    calls = counted(m)
    with torch.no_grad():
        first, second = m(X), m(X)
    with torch.inference_mode():
        third = m(X)
    assert calls[0] == 1
    torch.testing.assert_close(first, reference(m, X), rtol=0, atol=0)
    assert torch.equal(first, second) and torch.equal(first, third)


@pytest.mark.parametrize("change", ["in_place", "optimizer_step", "load_state_dict", "act_parameter", "dtype"])
def test_any_change_of_a_tensor_recomputes(change):
    m = layer(nn.PReLU(C)).eval()
    calls = counted(m)
    with torch.no_grad():
        before = m(X)
    if change == "in_place":
        with torch.no_grad():
            m.proxy_bias.add_(0.5)
    elif change == "optimizer_step":
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(X).square().sum().backward()
        opt.step()
        m.eval()
    elif change == "load_state_dict":
        m.load_state_dict(layer(nn.PReLU(C), seed=3).state_dict())
    elif change == "act_parameter":
        with torch.no_grad():
            m.act.weight.fill_(0.9)
    else:
        m.double()
    x = X.to(m.weight.dtype)
    with torch.no_grad():
        after = m(x)
    assert calls[0] == (2 if change != "optimizer_step" else 3)  # (+1: the training forward)
    if change == "dtype":
        assert after.dtype == torch.float64
    else:
        assert not torch.allclose(after, before)
    torch.testing.assert_close(after, reference(m, x), rtol=0, atol=0)


def test_training_and_recorded_gradients_never_use_the_cache():
    m = layer().eval()
    calls = counted(m)
    with torch.no_grad():
        m(X)
    out = m(X)  # eval, grad enabled, trainable parameters: the moments stay differentiable
    out.sum().backward()
    assert calls[0] == 2 and m.proxy_weight.grad is not None and m.proxy_weight.grad.abs().sum() > 0
    m.train()
    m(X)
    assert calls[0] == 3 and m._moment_cache is None  # a training forward drops the cache
    for p in m.parameters():
        p.requires_grad_(False)
    m.eval()
    m(X), m(X)  # frozen parameters: cached even with grad mode on
    assert calls[0] == 4


def test_export_and_jit_trace_keep_the_moment_computation():
    """torch.export (dynamo ONNX) and torch.jit.trace (legacy ONNX) record the computation, not the
    cached constants: the graphs follow a later change of the parameters."""
    m = layer().eval()
    with torch.no_grad():
        m(X)  # fill the cache
        program = torch.export.export(m, (X,))
        traced = torch.jit.trace(m, (X,))
    with torch.no_grad():
        m.proxy_weight.add_(0.4)  # the exported program and the fx graph must follow the new value
        want = reference(m, X)
        program.state_dict["proxy_weight"].copy_(m.proxy_weight)
        torch.testing.assert_close(program.module()(X), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traced(X), want, rtol=1e-6, atol=1e-6)
