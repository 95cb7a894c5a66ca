"""Each layer against an independent numpy float64 formula, in both layouts, plus its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normsurgeon import layers

C = 6


def np_norm(x: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    """(x - mean) / sqrt(biased var + eps) over ``axes`` of a float64 array."""
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def affine(y: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    shape = (1, -1) + (1,) * (y.ndim - 2)
    return y * w.reshape(shape) + b.reshape(shape)


def with_params(module: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.rand(C, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(C, generator=gen))
    return module


def np_params(module):
    return module.weight.detach().double().numpy(), module.bias.detach().double().numpy()


def run_both_layouts(make, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Output on channels-first x, and on the channels-last version of x moved back."""
    first = make(False)(x)
    last = make(True)(x.movedim(1, -1).contiguous()).movedim(-1, 1)
    return first.detach().double().numpy(), last.detach().double().numpy()


X = torch.randn(4, C, 5, 3, generator=torch.Generator().manual_seed(0)) * 2 + 0.7
XN = X.double().numpy()


def test_batch_norm_train_matches_formula_and_updates_running_stats():
    def make(cl):
        return with_params(layers.BatchNorm(C, eps=1e-3, momentum=0.2, channels_last=cl)).train()
    first, last = run_both_layouts(make, X)
    bn = make(False)
    expected = affine(np_norm(XN, (0, 2, 3), 1e-3), *np_params(bn))
    np.testing.assert_allclose(first, expected, atol=1e-5)
    np.testing.assert_allclose(last, expected, atol=1e-5)
    bn(X)
    n = XN.size / C
    unbiased = XN.var(axis=(0, 2, 3)) * n / (n - 1)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.8 * 1 + 0.2 * unbiased, rtol=1e-5)
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.2 * XN.mean(axis=(0, 2, 3)), atol=1e-6)
    assert int(bn.num_batches_tracked) == 1


def test_batch_norm_eval_uses_running_stats_and_cumulative_momentum():
    bn = with_params(layers.BatchNorm(C, momentum=None)).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.arange(C, dtype=torch.float32))
        bn.running_var.copy_(torch.arange(C, dtype=torch.float32) + 1)
    w, b = np_params(bn)
    mean = np.arange(C).reshape(1, -1, 1, 1)
    var = (np.arange(C) + 1).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(bn(X).detach().numpy(), affine((XN - mean) / np.sqrt(var + 1e-5), w, b), atol=1e-5)
    bn.train()
    bn(X), bn(X * 3)
    both = np.stack([XN.mean(axis=(0, 2, 3)), 3 * XN.mean(axis=(0, 2, 3))])
    # momentum=None: the running mean is the plain average over the batches seen since reset
    bn2 = layers.BatchNorm(C, momentum=None).train()
    bn2(X), bn2(X * 3)
    np.testing.assert_allclose(bn2.running_mean.numpy(), both.mean(axis=0), rtol=1e-5)


def test_frozen_batch_norm_is_a_fixed_affine_map_in_both_modes():
    fb = layers.FrozenBatchNorm(C, eps=1e-4)
    with torch.no_grad():
        fb.weight.copy_(torch.linspace(0.5, 2, C))
        fb.bias.copy_(torch.linspace(-1, 1, C))
        fb.running_mean.copy_(torch.linspace(-2, 2, C))
        fb.running_var.copy_(torch.linspace(0.1, 3, C))
    w, b = np_params(fb)
    m = fb.running_mean.double().numpy().reshape(1, -1, 1, 1)
    v = fb.running_var.double().numpy().reshape(1, -1, 1, 1)
    expected = affine((XN - m) / np.sqrt(v + 1e-4), w, b)
    for mode in (True, False):
        np.testing.assert_allclose(fb.train(mode)(X).detach().numpy(), expected, atol=1e-5)
    assert [n for n, _ in fb.named_parameters()] == []
    trainable = layers.FrozenBatchNorm(C, trainable_affine=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {"weight", "bias"}
    # the statistics stay frozen, as Parameters (Opacus refuses buffers in a trainable layer)
    assert list(trainable.buffers()) == []
    assert set(trainable.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_group_norm_matches_formula(groups):
    def make(cl):
        return with_params(layers.GroupNorm(C, groups, eps=1e-4, channels_last=cl))
    first, last = run_both_layouts(make, X)
    grouped = XN.reshape(4, groups, C // groups, 5, 3)
    expected = affine(np_norm(grouped, (2, 3, 4), 1e-4).reshape(XN.shape), *np_params(make(False)))
    np.testing.assert_allclose(first, expected, atol=1e-5)
    np.testing.assert_allclose(last, expected, atol=1e-5)


def test_layer_norm_is_over_channels_and_positions_per_sample():
    def make(cl):
        return with_params(layers.GroupNorm1(C, channels_last=cl))
    first, last = run_both_layouts(make, X)
    expected = affine(np_norm(XN, (1, 2, 3), 1e-5), *np_params(make(False)))
    np.testing.assert_allclose(first, expected, atol=1e-5)
    np.testing.assert_allclose(last, expected, atol=1e-5)


def test_instance_norm_is_over_positions_per_sample_and_channel():
    def make(cl):
        return with_params(layers.InstanceNorm(C, channels_last=cl))
    first, last = run_both_layouts(make, X)
    expected = affine(np_norm(XN, (2, 3), 1e-5), *np_params(make(False)))
    np.testing.assert_allclose(first, expected, atol=1e-5)
    np.testing.assert_allclose(last, expected, atol=1e-5)


def test_positional_norm_is_over_channels_at_each_position():
    def make(cl):
        return with_params(layers.PositionalNorm(C, channels_last=cl))
    first, last = run_both_layouts(make, X)
    expected = affine(np_norm(XN, (1,), 1e-5), *np_params(make(False)))
    np.testing.assert_allclose(first, expected, atol=1e-5)
    np.testing.assert_allclose(last, expected, atol=1e-5)


def test_batch_independent_layers_do_not_mix_samples():
    for layer in (layers.GroupNorm(C, 3), layers.GroupNorm1(C), layers.InstanceNorm(C),
                  layers.PositionalNorm(C), layers.FrozenBatchNorm(C)):
        whole = layer.train()(X)
        alone = torch.cat([layer(X[i:i + 1]) for i in range(len(X))])
        torch.testing.assert_close(whole, alone, atol=1e-6, rtol=0)


def test_fused_drop_and_act_run_after_the_norm():
    act = nn.SiLU()
    gn = with_params(layers.GroupNorm(C, 2, act=act))
    plain = with_params(layers.GroupNorm(C, 2))
    torch.testing.assert_close(gn(X), act(plain(X)))
    assert set(gn.state_dict()) == {"weight", "bias"}


def test_degenerate_statistics_are_clear_errors():
    with pytest.raises(ValueError, match="batch of 2 or more"):
        layers.BatchNorm(C).train()(torch.randn(1, C))
    layers.BatchNorm(C).eval()(torch.randn(1, C))  # eval uses running statistics: fine
    with pytest.raises(ValueError, match="one position"):
        layers.InstanceNorm(C)(torch.randn(2, C, 1, 1))
    with pytest.raises(ValueError, match="single value per group"):
        layers.GroupNorm(C, C)(torch.randn(2, C, 1, 1))
    with pytest.raises(ValueError, match="does not divide"):
        layers.GroupNorm(C, 4)
    bn = layers.BatchNorm(C)
    bn.site_name = "stem.bn"
    with pytest.raises(ValueError, match="stem.bn"):
        bn.train()(torch.randn(1, C, 1))


def test_gradients_flow_through_every_layer():
    for layer in (layers.BatchNorm(C), layers.GroupNorm(C, 2), layers.GroupNorm1(C),
                  layers.InstanceNorm(C), layers.PositionalNorm(C),
                  layers.FrozenBatchNorm(C, trainable_affine=True)):
        x = X.clone().requires_grad_()
        (layer(x) * torch.arange(x.numel()).view_as(x)).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_batch_norm_without_statistics_takes_them_from_its_first_training_batch():
    bn = layers.BatchNorm(C, momentum=0.1, statistics_pending=True).train()
    bn(X)
    n = XN.size / C
    np.testing.assert_allclose(bn.running_mean.numpy(), XN.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), XN.var(axis=(0, 2, 3)) * n / (n - 1), rtol=1e-5)
    assert bn.momentum == 0.1 and not bn.statistics_pending
    bn(X * 2)  # from now on the usual exponential average
    np.testing.assert_allclose(bn.running_mean.numpy(), 1.1 * XN.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    fresh = layers.BatchNorm(C, statistics_pending=True)
    fresh.load_state_dict(bn.state_dict())
    assert not fresh.statistics_pending
