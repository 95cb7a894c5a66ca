"""proxy_gn / proxy_ln conversions: which sites get PN, fused activations applied exactly
once, every activation form (shared module, functional, in-place, method, swish, timm fused)."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from scipy.stats import norm as normal
from torch import nn
from torch.nn import functional as F

import normsurgeon as ns
from normsurgeon.layers import GroupNorm, ProxyNormAct

from conftest import randomize_norms


def pn_reference(layer: ProxyNormAct, x: torch.Tensor, phi) -> np.ndarray:
    """Independent PN-Act: numpy float64 group norm, scipy quantile grid, numpy moments."""
    xn = x.detach().double().numpy()
    n, c = xn.shape[:2]
    grouped = xn.reshape(n, layer.num_groups, -1)
    y = ((grouped - grouped.mean(-1, keepdims=True)) /
         np.sqrt(grouped.var(-1, keepdims=True) + layer.eps)).reshape(xn.shape)
    shape = (1, c) + (1,) * (xn.ndim - 2)
    g, b, gt, bt = (p.detach().double().numpy() for p in
                    (layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias))
    u = normal.ppf((np.arange(200) + 0.5) / 200)
    z = phi(g[:, None] * ((1 + gt[:, None]) * u + bt[:, None]) + b[:, None])
    m, s = z.mean(1), 1 / np.sqrt(z.var(1) + 0.03)
    return (phi(g.reshape(shape) * y + b.reshape(shape)) - m.reshape(shape)) * s.reshape(shape)


def relu(z):
    return np.maximum(z, 0)


def randomize_proxy(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ProxyNormAct):
                m.proxy_weight.copy_(torch.randn(m.num_channels, generator=gen) * 0.2)
                m.proxy_bias.copy_(torch.randn(m.num_channels, generator=gen) * 0.2)


def test_torchvision_resnet50_gets_pn_exactly_at_bn1_bn2():
    model = torchvision.models.resnet50()
    new = ns.convert(model, to="proxy_gn")
    rows = new.normsurgeon_report.rows
    for row in rows:
        leaf = row.name.rsplit(".", 1)[-1]
        if leaf in ("bn1", "bn2"):
            assert row.new_type == "ProxyNormAct", row.name
        else:
            assert leaf == "bn3" or row.name.endswith("downsample.1"), row.name
            assert row.new_type == "GroupNorm" and row.notes[0].startswith("no PN:"), row.name
    assert sum(r.new_type == "ProxyNormAct" for r in rows) == 33
    assert isinstance(new, torchvision.models.ResNet) and type(model.layer1[0].bn1) is nn.BatchNorm2d
    out = new.train()(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in new.parameters() if p.grad is not None)


def test_resnet18_each_site_computes_the_formula_and_no_activation_runs_twice():
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet18())
    new = ns.convert(model, to="proxy_gn", num_groups=8)
    randomize_proxy(new)
    seen: dict[str, tuple] = {}
    hooks = []
    for name, m in new.named_modules():
        if isinstance(m, (ProxyNormAct, nn.Conv2d, nn.MaxPool2d)):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(name, (args[0].detach(), out.detach()))))
    for mode in (True, False):
        seen.clear()
        new.train(mode)(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
        pn_sites = [n for n, m in new.named_modules() if isinstance(m, ProxyNormAct)]
        assert len(pn_sites) == 9  # stem bn1 + bn1 of each of the 8 BasicBlocks
        for name in pn_sites:
            x, out = seen[name]
            np.testing.assert_allclose(out.numpy(), pn_reference(new.get_submodule(name), x, relu), atol=2e-5)
            # what the next layer receives is the PN output itself, not relu(PN output)
            nxt = "maxpool" if name == "bn1" else name.rsplit(".", 1)[0] + ".conv2"
            assert (out < 0).any() and torch.equal(seen[nxt][0], out), name
    for h in hooks:
        h.remove()


class Activations(nn.Module):
    """Norms followed by activations in every form the pass must understand."""

    def __init__(self, c=8):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else c, c, 3, padding=1) for i in range(9))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(9))
        self.shared = nn.ReLU(inplace=True)
        self.gelu = nn.GELU(approximate="tanh")
        self.prelu = nn.PReLU(c)
        self.mish = timm.layers.Mish()

    def forward(self, x):
        c, b = self.convs, self.bns
        x = F.relu(b[0](c[0](x)))                      # functional
        x = self.shared(b[1](c[1](x)))                 # shared, in-place module
        y = b[2](c[2](x))
        x = y * torch.sigmoid(y)                       # swish pattern
        x = b[3](c[3](x)).relu()                       # tensor method
        x = self.gelu(b[4](c[4](x)))                   # dedicated module: swapped for Identity
        x = F.leaky_relu(b[5](c[5](x)), 0.2)           # function with a constant argument
        x = self.prelu(b[6](c[6](x)))                  # per-channel parameters
        x = self.shared(self.mish(b[7](c[7](x))))      # timm activation module
        x = b[8](c[8](x)) + x                          # feeds an add: no PN
        return self.shared(x)


PHIS = {0: relu, 1: relu, 2: lambda z: z / (1 + np.exp(-z)), 3: relu,
        4: lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3))),
        5: lambda z: np.where(z > 0, z, 0.2 * z), 7: lambda z: z * np.tanh(np.log1p(np.exp(z)))}


@pytest.mark.parametrize("to", ["proxy_gn", "proxy_ln"])
def test_every_activation_form_is_fused_once(to):
    torch.manual_seed(0)
    model = randomize_norms(Activations())
    with torch.no_grad():
        model.prelu.weight.copy_(torch.linspace(0.05, 0.5, 8))
    new = ns.convert(model, to=to, **({"num_groups": 4} if to == "proxy_gn" else {}))
    rows = {r.name: r for r in new.normsurgeon_report.rows}
    assert [rows[f"bns.{i}"].new_type for i in range(9)] == ["ProxyNormAct"] * 8 + ["GroupNorm" if to == "proxy_gn" else "GroupNorm1"]
    assert "feeds add()" in rows["bns.8"].notes[0]
    assert type(new.gelu) is nn.Identity and type(new.shared) is nn.ReLU  # dedicated swapped, shared kept
    randomize_proxy(new)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    captured = {}
    for i in range(9):
        new.bns[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, (a[0].clone(), o.clone())))
        new.convs[i].register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(f"in{i}", a[0].clone()))
    for mode in (True, False):
        out = new.train(mode)(x)
        for i in range(8):
            inp, got = captured[i]
            layer = new.bns[i]
            if i == 6:
                slope = model.prelu.weight.detach().double().numpy()
                phi = lambda z, s=slope: np.where(z > 0, z, z * (s.reshape(-1, 1) if z.ndim == 2 else s.reshape(1, -1, 1, 1)))
            else:
                phi = PHIS[i]
            np.testing.assert_allclose(got.detach().numpy(), pn_reference(layer, inp, phi), atol=3e-5, err_msg=str(i))
            if i < 7:  # the next conv sees exactly the PN output: the activation ran once
                assert torch.equal(captured[f"in{i + 1}"], got), i
        assert torch.isfinite(out).all()
    copied = copy.deepcopy(new).eval()
    torch.testing.assert_close(copied(x), new.eval()(x))
    with pytest.raises(TypeError, match="normsurgeon.save"):
        pickle.dumps(ns.convert(model, to=to))


def test_timm_fused_normact_gets_pn_and_plain_where_act_is_identity():
    model = timm.create_model("efficientnet_b0", num_classes=5)
    new = ns.convert(model, to="proxy_gn")
    rows = new.normsurgeon_report.rows
    for row in rows:
        src = model.get_submodule(row.name)
        if isinstance(src.act, nn.Identity):
            assert row.new_type == "GroupNorm", row.name
        else:
            assert row.new_type == "ProxyNormAct" and type(new.get_submodule(row.name).act) is nn.SiLU
    assert not hasattr(new.blocks[1][0], "forward") or "forward" not in vars(new.blocks[1][0])
    out = new.train()(torch.randn(2, 3, 32, 32))
    out.sum().backward()


class NotElementwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.softmax(self.bn(self.conv(x)), dim=1)
        y = self.bn2(x)
        return F.max_pool2d(y, 2) + F.relu(y)


def test_non_elementwise_consumers_are_never_fused():
    new = ns.convert(NotElementwise(), to="proxy_gn", num_groups=2)
    rows = {r.name: r for r in new.normsurgeon_report.rows}
    assert rows["bn"].new_type == "GroupNorm" and "softmax" in rows["bn"].notes[0]
    assert rows["bn2"].new_type == "GroupNorm" and "2 consumers" in rows["bn2"].notes[0]


def test_groups_that_do_not_divide_name_the_layer():
    with pytest.raises(ValueError, match="num_groups=5 does not divide the 64 channels of 'bn1'"):
        ns.convert(torchvision.models.resnet18(), to="proxy_gn", num_groups=5)


def test_whole_converted_model_is_batch_independent_and_train_equals_eval():
    new = ns.convert(randomize_norms(torchvision.models.resnet18()), to="proxy_ln")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = new.train()(x)
        for i in range(0, 8, 3):
            assert (new(x[i:i + 1]) - together[i:i + 1]).abs().max() <= 1e-5
        assert (new.eval()(x) - together).abs().max() <= 1e-6


def test_proxy_model_saves_and_loads(tmp_path):
    new = ns.convert(torchvision.models.resnet18(), to="proxy_gn")
    randomize_proxy(new)
    ns.save(new, tmp_path / "pn.pt")
    again = ns.load(tmp_path / "pn.pt", torchvision.models.resnet18())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), new.eval()(x))


def test_param_groups_decay_only_proxy_parameters_among_norms():
    new = ns.convert(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1), to="proxy_gn")
    model = ns.convert(torchvision.models.resnet18(), to="proxy_gn")
    for m in (model, new):
        decay, no_decay = ns.param_groups(m, weight_decay=0.05, lr=0.1)
        names = dict(decay=set(decay["param_names"]), no_decay=set(no_decay["param_names"]))
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 0.1
        assert len(names["decay"]) + len(names["no_decay"]) == len(list(m.parameters()))
        for name, module in m.named_modules():
            if isinstance(module, ProxyNormAct):
                assert {f"{name}.proxy_weight", f"{name}.proxy_bias"} <= names["decay"]
                assert {f"{name}.weight", f"{name}.bias"} <= names["no_decay"]
            elif isinstance(module, (GroupNorm, nn.LayerNorm)):
                assert f"{name}.weight" in names["no_decay"]
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                assert f"{name}.weight" in names["decay"]
                if module.bias is not None:
                    assert f"{name}.bias" in names["no_decay"]
    assert {"cls_token", "pos_embed"} <= set(ns.param_groups(new, 0.05)[1]["param_names"])
    torch.optim.SGD(ns.param_groups(model, 1e-4), lr=0.1).step()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, shortcut=None):
        out = F.relu(self.bn(self.conv(x)))
        return out if shortcut is None else out + shortcut


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TwoInputs()

    def forward(self, x):
        return self.block(x)


def test_owner_with_several_inputs_is_not_rewritten_and_says_why():
    new = ns.convert(Wrapper(), to="proxy_gn", num_groups=2)
    row = new.normsurgeon_report.rows[0]
    assert row.new_type == "GroupNorm" and "forward(x, shortcut)" in row.notes[0]
    assert "forward" not in vars(new.block)
    new(torch.randn(2, 3, 4, 4))
