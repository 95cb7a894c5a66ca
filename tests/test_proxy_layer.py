"""PN-Act against an independent numpy/scipy computation; gradcheck; batch independence."""
from __future__ import annotations

import numpy as np
import pytest
import timm.layers
import torch
from scipy.stats import norm as normal
from torch import nn

from normsurgeon.layers import ProxyNormAct

C = 5
ACTIVATIONS = {
    "relu": (nn.ReLU(inplace=True), lambda z: np.maximum(z, 0)),
    "silu": (nn.SiLU(), lambda z: z / (1 + np.exp(-z))),
    "gelu_tanh": (nn.GELU(approximate="tanh"),
                  lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))),
    "leaky_relu": (nn.LeakyReLU(0.2), lambda z: np.where(z > 0, z, 0.2 * z)),
    "hardswish": (nn.Hardswish(), lambda z: z * np.clip(z + 3, 0, 6) / 6),
    "elu": (nn.ELU(), lambda z: np.where(z > 0, z, np.exp(z) - 1)),
    "timm_mish": (timm.layers.Mish(), lambda z: z * np.tanh(np.log1p(np.exp(z)))),
    "relu6": (nn.ReLU6(), lambda z: np.clip(z, 0, 6)),
}


def random_layer(act, seed=0, groups=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    layer = ProxyNormAct(C, groups, act)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=gen) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen) * 0.5)
        layer.proxy_weight.copy_(torch.randn(C, generator=gen) * 0.3)
        layer.proxy_bias.copy_(torch.randn(C, generator=gen) * 0.3)
    return layer.to(dtype)


def numpy_moments(layer, phi, points=200, eps=0.03):
    u = normal.ppf((np.arange(points) + 0.5) / points)
    g, b = (p.detach().double().numpy()[:, None] for p in (layer.weight, layer.bias))
    gt, bt = (p.detach().double().numpy()[:, None] for p in (layer.proxy_weight, layer.proxy_bias))
    z = phi(g * ((1 + gt) * u[None, :] + bt) + b)
    return z.mean(axis=1), 1 / np.sqrt(z.var(axis=1) + eps)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_proxy_moments_match_an_independent_computation(name):
    act, phi = ACTIVATIONS[name]
    for seed in range(3):
        layer = random_layer(act, seed)
        m, s = layer.proxy_moments()
        m_ref, s_ref = numpy_moments(layer, phi)
        np.testing.assert_allclose(m.detach().numpy(), m_ref, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(s.detach().numpy(), s_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("groups", [1, 5])
def test_forward_matches_the_formula(groups):
    act, phi = ACTIVATIONS["silu"]
    layer = random_layer(act, groups=groups)
    x = torch.randn(3, C, 4, 4, generator=torch.Generator().manual_seed(1))
    xn = x.double().numpy().reshape(3, groups, -1)
    y = ((xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)).reshape(3, C, 4, 4)
    g, b = (p.detach().double().numpy().reshape(1, C, 1, 1) for p in (layer.weight, layer.bias))
    m, s = numpy_moments(layer, phi)
    expected = (phi(g * y + b) - m.reshape(1, C, 1, 1)) * s.reshape(1, C, 1, 1)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, atol=1e-5)
    last = layer
    last.channels_last = True
    np.testing.assert_allclose(last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).detach().numpy(),
                               expected, atol=1e-5)


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.LeakyReLU(0.1)])
def test_gradcheck_input_and_all_four_parameters(act):
    layer = random_layer(act, groups=1, dtype=torch.float64)
    x = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
    names = ["weight", "bias", "proxy_weight", "proxy_bias"]
    values = [getattr(layer, n).detach().clone().requires_grad_() for n in names]

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *values))


def test_moments_stay_in_float32_under_half_precision():
    layer = random_layer(nn.SiLU()).to(torch.bfloat16)
    m, s = layer.proxy_moments()
    assert m.dtype == torch.float32 and layer(torch.randn(2, C, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_batch_independence_and_train_equals_eval():
    layer = random_layer(nn.GELU(), groups=5)
    batch = torch.randn(8, C, 6, 6, generator=torch.Generator().manual_seed(3))
    layer.train()
    together = layer(batch)
    for i in range(8):
        assert (layer(batch[i:i + 1]) - together[i:i + 1]).abs().max() <= 1e-6
    layer.eval()
    assert (layer(batch) - together).abs().max() <= 1e-6


def test_inplace_activation_is_copied_not_mutated():
    act = nn.ReLU(inplace=True)
    layer = ProxyNormAct(C, 1, act)
    assert act.inplace and not layer.act.inplace
    assert set(layer.state_dict()) == {"weight", "bias", "proxy_weight", "proxy_bias"}
