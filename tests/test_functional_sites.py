"""Functional norms (F.batch_norm, F.group_norm, F.layer_norm in a forward) are sites converted by a
graph pass on their module's forward: class and state_dict keys kept, train and eval both right."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsurgeon as ns


class Block(nn.Module):
    """conv → F.batch_norm → relu → conv → F.group_norm(4) → relu, with its own tensors."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        g = torch.Generator().manual_seed(0)
        self.bn_weight = nn.Parameter(1 + 0.2 * torch.randn(c, generator=g))
        self.bn_bias = nn.Parameter(0.1 * torch.randn(c, generator=g))
        self.register_buffer("running_mean", 0.1 * torch.randn(c, generator=g))
        self.register_buffer("running_var", 1 + torch.rand(c, generator=g))
        self.gn_weight = nn.Parameter(1 + 0.2 * torch.randn(c, generator=g))
        self.gn_bias = nn.Parameter(0.1 * torch.randn(c, generator=g))

    def forward(self, x):
        x = F.batch_norm(self.conv1(x), self.running_mean, self.running_var, self.bn_weight, self.bn_bias,
                         self.training, 0.1, 1e-5)
        x = F.relu(x)
        return F.relu(F.group_norm(self.conv2(x), 4, self.gn_weight, self.gn_bias, 1e-5))


class Net(nn.Module):
    """Block, then a channels-last F.layer_norm over C in the root's own forward, then a head."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.block = Block(c)
        self.proj = nn.Conv2d(c, c, 1)
        self.ln_weight = nn.Parameter(1 + 0.2 * torch.randn(c, generator=torch.Generator().manual_seed(1)))
        self.ln_bias = nn.Parameter(torch.full((c,), 0.05))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.proj(self.block(x)).permute(0, 2, 3, 1)
        x = F.layer_norm(x, (8,), self.ln_weight, self.ln_bias, 1e-5)
        return self.head(x.mean((1, 2)))


SITES = {"block.batch_norm_0": "batch", "block.group_norm_0": "group", "layer_norm_0": "positional"}


def convert(model, to, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ns.convert(model, to=to, input_size=(3, 8, 8), **options)


@pytest.mark.parametrize("to", ["gn", "ln", "bn", "frozen_bn", "proxy_gn"])
def test_functional_sites_convert_train_and_eval(to):
    torch.manual_seed(0)
    model = Net()
    keys = set(model.state_dict())
    new = convert(model, to, **({"num_groups": 2} if to in ("gn", "proxy_gn") else {}))
    rows = {r.name: r for r in new.normsurgeon_report.rows}
    assert set(SITES) <= set(rows)
    converted = {n for n in SITES if rows[n].status == "converted"}
    assert converted == (set(SITES) if to != "frozen_bn" else {"block.batch_norm_0"})  # frozen_bn: needs statistics
    assert type(new) is Net and "forward" not in model.__dict__ and "forward" not in model.block.__dict__
    assert keys <= set(new.state_dict())  # every original key stays; new tensors only in the new children
    assert all(k in keys or k.split(".")[-2] in ("batch_norm_0", "group_norm_0", "layer_norm_0")
               or ".".join(k.split(".")[:-1]).endswith(("_norm_0", "_norm_0.act", "_norm_0.drop"))
               for k in new.state_dict())
    for name in converted:
        child = new.get_submodule(name)
        assert child is not None and not isinstance(child, ns.surgery.graph.functional_sites.FunctionalNorm)
    x = torch.randn(4, 3, 8, 8)
    new.train()
    out = new(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None for n, p in new.named_parameters() if any(s in n for s in converted))
    new.eval()
    with torch.no_grad():
        assert torch.isfinite(new(x)).all()


@pytest.mark.parametrize("to", ["bn", "frozen_bn"])
def test_functional_batch_norm_to_bn_and_frozen_bn_preserves_the_function(to):
    torch.manual_seed(0)
    model = Net()
    new = convert(model, to, include="block.batch_norm_0")
    x = torch.randn(4, 3, 8, 8)
    modes = (True, False) if to == "bn" else (False,)
    for train in modes:
        model.train(train), new.train(train)
        with ns.model_state.preserved(model, buffers=True), ns.model_state.preserved(new, buffers=True):
            torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)
    if to == "bn":  # a train-mode forward updates the new layer's running statistics like F.batch_norm did
        model.train(), new.train()
        model(x), new(x)
        torch.testing.assert_close(new.block.batch_norm_0.running_mean, model.block.running_mean)


def test_functional_sites_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    new = convert(Net(), "gn", num_groups=2)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ns.save(new, tmp_path / "net.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = ns.load(tmp_path / "net.pt", Net())
    x = torch.randn(2, 3, 8, 8)
    for train in (True, False):
        new.train(train), again.train(train)
        torch.testing.assert_close(again(x), new(x))
    assert again.state_dict().keys() == new.state_dict().keys()


def test_functional_sites_get_the_shapes_of_their_calls_and_are_checked():
    """The owner's input from the whole-model probe, its graph run on meta: each call's own shapes
    (here the channels-last layer_norm sees (N, H, W, C) = (2, 4, 6, 8) for a 3 × 4 × 6 input)."""
    new = ns.convert(Net(), to="gn", num_groups=2, input_size=(3, 4, 6))
    rows = {r.name: r for r in new.normsurgeon_report.rows}
    assert rows["block.batch_norm_0"].input_shape == (2, 8, 4, 6)
    assert rows["block.group_norm_0"].input_shape == (2, 8, 4, 6)
    assert rows["layer_norm_0"].input_shape == (2, 4, 6, 8)
    assert new.normsurgeon_report.verify.startswith("3 call(s) checked on meta tensors")


def test_a_new_module_that_does_not_fit_a_functional_site_stops_the_conversion():
    from normsurgeon.surgery import Built, ConversionError, register_target, unregister_target
    register_target("toy_nine", lambda source, site, options: Built(nn.GroupNorm(1, 9)), summary="9 channels")
    try:
        model = Net()
        with pytest.raises(ConversionError, match=r"at 'block.batch_norm_0' does not fit its call site"):
            ns.convert(model, to="toy_nine", inplace=True, input_size=(3, 8, 8))
        assert "forward" not in model.block.__dict__ and not hasattr(model.block, "batch_norm_0")
    finally:
        unregister_target("toy_nine")
