"""bgn / iebn conversions: exact eval transfer on real and randomized weights, IEBN placement
from the graph, options and errors."""
from __future__ import annotations

import pytest
import torch
import torchvision

import normsurgeon as ns
from normsurgeon import layers, zoo

from conftest import randomize_norms


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet50()).eval()


@pytest.fixture(scope="module")
def lite0():
    return zoo.efficientnet_lite0().eval()


@pytest.fixture(scope="module")
def photos():
    return zoo.sample_images(names=["chelsea", "coffee"])[0]


BGN_SETTINGS = [dict(num_groups=1), dict(num_groups=2), dict(num_groups=4), dict(num_groups=8),
                dict(group_size=1), dict(num_groups="auto", batch_size=2)]


@pytest.mark.parametrize("options", BGN_SETTINGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_bgn_is_function_preserving_in_eval(resnet50, lite0, photos, options):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for model, inp in ((resnet50, x), (lite0, photos)):
        new = ns.convert(model, to="bgn", **options).eval()
        assert all(isinstance(new.get_submodule(r.name), layers.BatchGroupNorm) for r in new.normsurgeon_report.rows)
        with torch.no_grad():
            assert rel_err(new(inp), model(inp)) <= 1e-5


def test_bgn_auto_rule_follows_the_batch_size():
    model = torchvision.models.resnet18()
    small = ns.convert(model, to="bgn", num_groups="auto", batch_size=2, input_size=(3, 64, 64))
    large = ns.convert(model, to="bgn", num_groups="auto", batch_size=32, input_size=(3, 64, 64))
    # at batch 32 the rule reproduces BatchNorm (one group per channel); at batch 2, G ≈ C/16
    assert all(m.num_groups == m.num_channels for m in large.modules() if isinstance(m, layers.BatchGroupNorm))
    assert {(m.num_channels, m.num_groups) for m in small.modules() if isinstance(m, layers.BatchGroupNorm)} == \
        {(64, 4), (128, 8), (256, 16), (512, 32)}


def test_iebn_is_function_preserving_in_train_and_eval(resnet50, lite0, photos):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for model, inp in ((resnet50, x), (lite0, photos)):
        new = ns.convert(model, to="iebn").eval()
        with torch.no_grad():
            assert rel_err(new(inp), model(inp)) <= 1e-5
    twin = ns.convert(resnet50, to="iebn")
    import copy
    original = copy.deepcopy(resnet50)
    with torch.no_grad():  # train mode: batch statistics of 2 samples, float32 rounding grows with depth
        assert rel_err(twin.train()(x), original.train()(x)) <= 1e-4
    torch.testing.assert_close(twin.layer1[0].bn1.running_mean, original.layer1[0].bn1.running_mean)


def test_iebn_keeps_exactly_the_resnet50_downsample_norms_as_bn(resnet50):
    new = ns.convert(resnet50, to="iebn")
    kept = {r.name for r in new.normsurgeon_report.rows if r.new_type != "InstanceEnhancementBatchNorm"}
    assert kept == {f"layer{i}.0.downsample.1" for i in range(1, 5)}
    assert all("shortcut norm" in new.normsurgeon_report.rows[[r.name for r in new.normsurgeon_report.rows].index(k)].notes[0]
               for k in kept)
    everywhere = ns.convert(resnet50, to="iebn", shortcut="iebn")
    assert all(r.new_type == "InstanceEnhancementBatchNorm" for r in everywhere.normsurgeon_report.rows)


def test_iebn_paper_init(resnet50):
    new = ns.convert(resnet50, to="iebn", init="paper")
    layer = new.layer1[0].bn1
    assert torch.equal(layer.weight, torch.ones_like(layer.weight))
    assert torch.equal(layer.attention_bias, torch.full_like(layer.attention_bias, -1.0))
    assert torch.equal(layer.attention_weight, torch.zeros_like(layer.attention_weight))
    torch.testing.assert_close(layer.bias, resnet50.layer1[0].bn1.bias)
    with pytest.raises(ValueError, match="init='bogus'"):
        ns.convert(resnet50, to="iebn", init="bogus")


def test_bgn_errors_name_the_problem():
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="num_groups=3 does not divide the 64 channels of 'bn1'"):
        ns.convert(model, to="bgn", num_groups=3)
    with pytest.raises(ValueError, match="batch_size="):
        ns.convert(model, to="bgn")
    new = ns.convert(model, to="bgn", group_size=1).train()  # G = C: BatchNorm; layer4 is 1x1 at 32 px
    with pytest.raises(ValueError, match="one value per statistic"):
        new(torch.randn(1, 3, 32, 32))
