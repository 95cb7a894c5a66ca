"""Per-sample gradients of every batch-independent layer under Opacus, against a loop.

Each layer sits between a layer upstream and one downstream (conv, or linear on tokens for the
channels-last layout), so the check covers the parameters feeding the layer and those reading
its output too (where pn once went wrong: a channels-last view given to the next conv). The
reference is plain autograd on one sample at a time, in float64.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("opacus", reason="Opacus is not installed: pip install 'normsurgeon[dp]'")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
from opacus import GradSampleModule  # noqa: E402
from opacus.grad_sample import GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping  # noqa: E402

from normsurgeon import layers  # noqa: E402
from normsurgeon.privacy import grad_samplers  # noqa: E402

C = 6
LAYERS = {
    "gn+silu": lambda cl: layers.GroupNorm(C, 2, channels_last=cl, act=nn.SiLU(inplace=True)),
    "ln": lambda cl: layers.GroupNorm1(C, channels_last=cl),
    "in+relu": lambda cl: layers.InstanceNorm(C, channels_last=cl, act=nn.ReLU(inplace=True)),
    "pn+gelu": lambda cl: layers.PositionalNorm(C, channels_last=cl, act=nn.GELU()),
    "frozen_bn+hardswish": lambda cl: layers.FrozenBatchNorm(C, trainable_affine=True, channels_last=cl,
                                                              act=nn.Hardswish()),
    "proxy_gn+relu": lambda cl: layers.ProxyNormAct(C, 3, nn.ReLU(inplace=True), channels_last=cl),
    "proxy_ln+silu": lambda cl: layers.ProxyNormAct(C, 1, nn.SiLU(), channels_last=cl),
    # a trainable activation fused into the norm: Opacus hooks it as a child of the layer
    "gn+prelu": lambda cl: layers.GroupNorm(C, 2, channels_last=cl, act=nn.PReLU()),
}
NO_EXPANDED_WEIGHTS = ("frozen_bn+hardswish", "proxy_gn+relu", "proxy_ln+silu")


class Net(nn.Module):
    """upstream → norm → downstream → pool → linear; channels-last = tokens (N, L, C)."""

    def __init__(self, norm: nn.Module, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.up = nn.Linear(3, C) if channels_last else nn.Conv2d(3, C, 3, padding=1)
        self.norm = norm
        self.down = nn.Linear(C, 4) if channels_last else nn.Conv2d(C, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.down(self.norm(self.up(x)))
        return self.head(h.mean(1) if self.channels_last else h.mean((2, 3)))


@torch.no_grad()
def randomized(layer: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in layer.named_parameters(recurse=False):
        if name == "running_var":
            p.copy_(torch.rand(p.shape, generator=gen) * 1.5 + 0.5)
        elif name.startswith("proxy"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        else:
            p.copy_(torch.rand(p.shape, generator=gen) * 2 - 0.7)
    return layer


def make_case(name: str, channels_last: bool):
    torch.manual_seed(1)
    net = Net(randomized(LAYERS[name](channels_last)), channels_last).double()
    gen = torch.Generator().manual_seed(2)
    shape = (3, 5, 3) if channels_last else (3, 3, 7, 7)
    return net, torch.randn(shape, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1])


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y, reduction="sum")


def loop_per_sample(net: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """∂L_n/∂p for each sample n by plain autograd, one sample at a time: (N, *p.shape)."""
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    rows = [torch.autograd.grad(loss_fn(net(x[i:i + 1]), y[i:i + 1]), list(params.values()))
            for i in range(len(x))]
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(params)}


def relative_errors(found: dict, ref: dict) -> dict[str, float]:
    """max |found − ref| / max |ref| per parameter; a parameter whose true per-sample gradient
    is zero (a conv bias before an instance norm) is measured against the largest of all."""
    scale = max(r.abs().max() for r in ref.values())
    return {n: ((found[n] - r).abs().max() / max(r.abs().max(), 1e-6 * scale)).item()
            for n, r in ref.items()}


def opacus_per_sample(net: nn.Module, x, y, mode: str) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(net)
    if mode == "ew":
        wrapped = GradSampleModuleExpandedWeights(net, loss_reduction="sum")
    else:
        wrapped = GradSampleModule(net, loss_reduction="sum", force_functorch=mode == "functorch")
    loss_fn(wrapped(x), y).backward()
    return {n: p.grad_sample for n, p in net.named_parameters() if p.requires_grad}


# a fused PReLU only with hooks: make_dp_ready refuses it with 'functorch' (Opacus counts it twice)
# and 'ew' (no rule), see test_dp_ready.test_unsupported_layers_are_refused_naming_them
CASES = [(name, mode) for name in LAYERS for mode in ("hooks", "functorch", "ew")
         if name != "gn+prelu" or mode == "hooks"]


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "tokens"])
@pytest.mark.parametrize("name,mode", CASES)
def test_per_sample_gradients_of_every_parameter_equal_a_loop(name, mode, channels_last):
    net, x, y = make_case(name, channels_last)
    if mode == "ew" and name in NO_EXPANDED_WEIGHTS:
        with pytest.raises(NotImplementedError, match="grad_sample_mode='hooks'"):
            opacus_per_sample(net, x, y, mode)
        return
    errors = relative_errors(opacus_per_sample(net, x, y, mode), loop_per_sample(net, x, y))
    assert set(errors) >= {"up.weight", "norm.weight", "norm.bias", "down.weight"}
    assert max(errors.values()) < 1e-9, errors


@pytest.mark.parametrize("name", list(LAYERS))
def test_ghost_clipping_norms_equal_the_loop(name):
    net, x, y = make_case(name, False)
    ref = loop_per_sample(net, x, y)
    ref_norms = torch.cat([g.flatten(1) for g in ref.values()], 1).norm(dim=1)
    wrapped = GradSampleModuleFastGradientClipping(copy.deepcopy(net), loss_reduction="sum",
                                                   max_grad_norm=1e9)
    loss_fn(wrapped(x), y).backward()
    torch.testing.assert_close(wrapped.get_norm_sample(), ref_norms, rtol=1e-9, atol=0)


def test_hooks_use_normsurgeons_samplers_not_functorch():
    """Opacus dispatches on the exact type: each of our classes has its own registered rule."""
    registered = GradSampleModule.GRAD_SAMPLERS
    for cls in (layers.GroupNorm, layers.GroupNorm1, layers.InstanceNorm, layers.PositionalNorm,
                layers.FrozenBatchNorm, layers.ProxyNormAct):
        assert registered[cls].__module__ == grad_samplers.__name__


def _proxy_layer(act: nn.Module, seed: int = 3) -> nn.Module:
    return randomized(layers.ProxyNormAct(C, 2, act), seed).double()


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU(), nn.GELU(), nn.LeakyReLU(0.2)],
                         ids=lambda a: type(a).__name__)
def test_proxy_rule_equals_vmap_grad_of_the_layer(act):
    """The derived PN-Act rule against torch.func: vmap over samples of grad(Σ g·out_n)."""
    layer = _proxy_layer(act)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, C, 4, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(5, C, 4, 3, generator=gen, dtype=torch.float64)
    params = dict(layer.named_parameters())

    def sample_loss(p, xn, gn):
        return (torch.func.functional_call(layer, p, (xn[None],)) * gn[None]).sum()

    expected = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, g)
    found = grad_samplers.compute_proxy_norm_act_grad_sample(layer, [x], g)
    for name, p in params.items():
        torch.testing.assert_close(found[p], expected[name], rtol=1e-10, atol=1e-12)


def test_proxy_rule_needs_its_moment_terms():
    """Guard against a rule that forgets that (m, s) depend on γ, β, γ̃, β̃: the moment part is
    a large share of the per-sample gradient, and γ̃, β̃ have nothing else."""
    layer = _proxy_layer(nn.SiLU())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64)
    found = grad_samplers.compute_proxy_norm_act_grad_sample(layer, [x], g)
    with torch.no_grad():
        mean, scale = layer.proxy_moments()
    z = torch.nn.functional.group_norm(x, 2, eps=layer.eps) * layer.weight.view(1, -1, 1, 1) \
        + layer.bias.view(1, -1, 1, 1)
    z.requires_grad_(True)
    (w,) = torch.autograd.grad(layer.act(z), z, g * scale.view(1, -1, 1, 1))
    direct_gamma = (w * (z - layer.bias.view(1, -1, 1, 1)) / layer.weight.view(1, -1, 1, 1)).sum((2, 3))
    moment_part = found[layer.weight] - direct_gamma
    assert moment_part.abs().max() > 0.1 * direct_gamma.abs().max()
    assert found[layer.proxy_weight].abs().max() > 1e-3


def test_proxy_layer_with_a_trainable_activation_is_refused_by_name():
    net = Net(layers.ProxyNormAct(C, 2, nn.PReLU()), False).double()
    net.norm.site_name = "stage1.norm"
    x, y = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(NotImplementedError, match="stage1.norm.*PReLU"):
        loss_fn(GradSampleModule(net, loss_reduction="sum")(x), y).backward()


def test_fused_random_drop_is_refused_by_name():
    net = Net(layers.GroupNorm(C, 2, drop=nn.Dropout(0.1)), False).double()
    net.norm.site_name = "stage2.norm"
    x, y = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(NotImplementedError, match="stage2.norm.*Dropout"):
        loss_fn(GradSampleModule(net, loss_reduction="sum")(x), y).backward()


def test_no_normsurgeon_layer_has_buffers_when_it_trains():
    """Opacus refuses any buffer in a trainable layer (validation and functorch)."""
    for make in LAYERS.values():
        layer = make(False)
        if isinstance(layer.act, nn.PReLU):
            continue
        assert list(layer.buffers()) == [], type(layer).__name__
        assert GradSampleModule.validate(nn.Sequential(layer), strict=False) == []


@pytest.mark.parametrize("name", list(LAYERS))
def test_an_empty_batch_gives_empty_per_sample_gradients(name):
    """Poisson sampling (make_private's default) can draw an empty batch."""
    net, _, _ = make_case(name, False)
    wrapped = GradSampleModule(net, loss_reduction="sum")
    wrapped(torch.zeros(0, 3, 7, 7, dtype=torch.float64)).sum().backward()
    for p in net.parameters():
        if p.requires_grad:
            assert p.grad_sample.shape == (0,) + p.shape
