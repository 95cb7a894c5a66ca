"""Pre-activation statistics: power split against constructed components, failure-mode
fractions against their closed forms, streaming = one-shot, and a recorder that leaves no trace."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import normsurgeon as ns
from normsurgeon.diagnostics import InstanceMoments, Recorder


def components(n=64, c=8, s=50, powers=(0.5, 0.3, 0.2), seed=0) -> torch.Tensor:
    """y = a_c + b_{n,c} + w_{n,c,s} with exactly zero-mean b (over n) and w (over s), scaled so
    that mean a² = PA, mean b² = PB, mean w² = PW."""
    gen = np.random.default_rng(seed)
    a = gen.normal(size=c)
    b = gen.normal(size=(n, c))
    b -= b.mean(axis=0)
    w = gen.normal(size=(n, c, s))
    w -= w.mean(axis=2, keepdims=True)
    a *= np.sqrt(powers[0] / np.mean(a ** 2))
    b *= np.sqrt(powers[1] / np.mean(b ** 2))
    w *= np.sqrt(powers[2] / np.mean(w ** 2))
    return torch.from_numpy(a[None, :, None] + b[:, :, None] + w)


def test_power_split_recovers_constructed_components():
    y = components()
    mom = InstanceMoments(8)
    mom.update(y)
    split = mom.power_split()
    for key, want in zip("ABW", (0.5, 0.3, 0.2)):
        assert abs(float(split[key]) - want) <= 0.01 * want, key
    assert abs(float(split["A"] + split["B"] + split["W"]) - float(y.square().mean())) < 1e-12


@pytest.mark.parametrize("splits", [[64], [1, 63], [10, 20, 34], [7] * 9 + [1]])
def test_streaming_equals_one_shot(splits):
    y = components(seed=1) * 3 + 100  # large offsets stress the merge
    ref = y.numpy()
    inst_mean, inst_var = ref.mean(axis=2), ref.var(axis=2)
    mom = InstanceMoments(8)
    for chunk in torch.split(y, splits):
        mom.update(chunk)
    split = mom.power_split()
    np.testing.assert_allclose(split["mean"].numpy(), inst_mean.mean(0), rtol=1e-6)
    np.testing.assert_allclose(split["var"].numpy(), inst_mean.var(0) + inst_var.mean(0), rtol=1e-6)
    np.testing.assert_allclose(float(split["B"]), inst_mean.var(0).mean(), rtol=1e-6)
    sd = np.sqrt(inst_var)
    np.testing.assert_allclose(float(mom.cv_sigma()), (sd.std(0) / sd.mean(0)).mean(), rtol=1e-6)


def test_instance_norm_output_has_no_inter_instance_power():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True))
    with torch.no_grad():
        model[1].bias.normal_()
    with Recorder(model) as rec:
        model(torch.randn(16, 3, 12, 12))
    (row,) = rec.statistics()
    assert row.f_B < 1e-6 and row.cv_sigma < 1e-3


def test_batch_norm_train_output_has_the_affine_channel_fraction():
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.normal_(1.0, 0.2)
        bn.bias.normal_(0.0, 0.2)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), bn).train()
    with Recorder(model) as rec:
        model(torch.randn(32, 3, 20, 20) * 10)
    (row,) = rec.statistics()
    beta2, gamma2 = bn.bias.detach().square().mean().item(), bn.weight.detach().square().mean().item()
    assert abs(row.f_A - beta2 / (beta2 + gamma2)) <= 1e-4


def test_recorder_leaves_the_model_as_it_found_it():
    model = ns.convert(timm.create_model("efficientnet_b0", num_classes=3), to="proxy_gn").eval()
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x)
    with Recorder(model) as rec:
        out = model(x)
    assert torch.equal(out, ref)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    rows = rec.statistics()
    assert len(rows) == 49 and [r.depth for r in rows] == list(range(49))
    assert rows[0].name == "bn1" and rows[0].module_type == "ProxyNormAct"


def test_fused_activation_sites_are_recorded_before_the_activation():
    model = timm.create_model("efficientnet_b0", num_classes=3).eval()
    with Recorder(model) as rec:
        model(torch.randn(2, 3, 32, 32))
    first = rec.statistics()[0]
    assert first.name == "bn1"
    # after SiLU every channel mean is > -0.28; before it, BN outputs have negative means too
    with torch.no_grad():
        pre = model.bn1.drop(torch.nn.functional.batch_norm(
            model.conv_stem(torch.randn(2, 3, 32, 32)), model.bn1.running_mean, model.bn1.running_var,
            model.bn1.weight, model.bn1.bias, False, 0.0, model.bn1.eps))
    assert pre.shape[1] == first.channels


def test_channels_last_layernorm_sites_are_per_channel():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3).eval()
    with Recorder(model) as rec:
        model(torch.randn(3, 3, 32, 32))
    rows = {r.name: r for r in rec.statistics()}
    assert rows["norm"].channels == 192 and rows["norm"].positions == 5  # 4 patches + class token


def test_non_finite_values_are_counted_not_propagated():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with Recorder(model) as rec:
        model(x)
    assert int(rec.nonfinite["1"]) == 4 and np.isfinite(rec.statistics()[0].A)


def test_resnet_records_every_site_once_per_call():
    model = torchvision.models.resnet18().eval()
    with Recorder(model) as rec:
        model(torch.randn(2, 3, 32, 32))
        model(torch.randn(3, 3, 32, 32))
    rows = rec.statistics()
    assert len(rows) == 20 and all(r.instances == 5 for r in rows)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU()])
def test_proxy_norm_preactivation_is_gamma_y_plus_beta_on_both_paths(act):
    from normsurgeon.layers import ProxyNormAct
    layer = ProxyNormAct(6, 2, act)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.normal_(), layer.proxy_weight.normal_(0, 0.3)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), layer)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad(), Recorder(model) as rec:
        model(x)
        y = nn.functional.group_norm(model[0](x), 2, None, None, layer.eps)
        z = (y * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)).double()
    (row,) = rec.statistics()
    np.testing.assert_allclose(row.mean.numpy(), z.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(row.var.numpy(), z.var(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-4)
