"""recalibrate_bn (every running-statistics norm) and the step-hook API."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normsurgeon as ns

from conftest import randomize_norms


def bn_model():
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))


def batch_statistics_of_inputs(model, layer, batches):
    """Independent: mean of batch means and of unbiased batch variances of ``layer``'s input."""
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for x in batches:
            model.train()(x)
    h.remove()
    means = torch.stack([s.transpose(0, 1).reshape(s.shape[1], -1).mean(1) for s in seen])
    vars_ = torch.stack([s.transpose(0, 1).reshape(s.shape[1], -1).var(1, unbiased=True) for s in seen])
    return means.mean(0), vars_.mean(0)


@pytest.mark.parametrize("to", [None, "bn", "iebn"])
def test_running_statistics_are_the_average_of_batch_statistics(to):
    model = bn_model() if to is None else ns.convert(bn_model(), to=to)
    batches = [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) * (1 + i) for i in range(4)]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    reference = {}
    for name in names:  # each on a fresh copy, so that earlier layers keep their original state
        twin = copy.deepcopy(model)
        reference[name] = batch_statistics_of_inputs(twin, twin.get_submodule(name), batches)
    model.eval()
    out = ns.recalibrate_bn(model, batches)
    assert out is model and not model.training
    for name in names:
        layer, (mean, var) = model.get_submodule(name), reference[name]
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-5)
        assert layer.momentum == 0.1  # restored


def test_bgn_group_statistics_and_dsbn_domains():
    bgn = ns.convert(bn_model(), to="bgn", num_groups=4)
    batches = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ns.recalibrate_bn(bgn, batches)
    layer = bgn[1]
    seen = []
    h = bgn[0].register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    with torch.no_grad():
        for x in batches:
            bgn[0](x)
    h.remove()
    group_means = torch.stack([s.reshape(s.shape[0], 4, -1).transpose(0, 1).reshape(4, -1).mean(1) for s in seen])
    torch.testing.assert_close(layer.running_mean, group_means.mean(0), rtol=1e-5, atol=1e-5)

    dsbn = ns.convert(bn_model(), to="dsbn", domains=["a", "b"])
    before_b = dsbn[1].running_mean[1].clone()
    ns.recalibrate_bn(dsbn, [(x, torch.zeros(4, dtype=torch.long), "a") for x in batches])
    assert torch.equal(dsbn[1].running_mean[1], before_b)  # domain b saw no batch: kept
    assert not torch.equal(dsbn[1].running_mean[0], before_b)


def test_recalibrate_bad_input_and_other_buffers_kept():
    model = bn_model()
    with pytest.raises(ValueError, match="no layer with running statistics"):
        ns.recalibrate_bn(nn.Sequential(nn.Conv2d(3, 3, 1)), torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="batch statistics need ≥ 2"):
        ns.recalibrate_bn(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        ns.recalibrate_bn(model, [])
    with pytest.raises(ValueError, match="NaN"):
        ns.recalibrate_bn(model, torch.full((4, 3, 8, 8), float("nan")))
    model.register_buffer("counter", torch.tensor(7.0))
    other = ns.recalibrate_bn(model, torch.randn(4, 3, 8, 8), inplace=False)
    assert other is not model and float(other.counter) == 7.0


class Stateful(nn.Module):
    """A fake stateful layer: counts steps; remembers the mean of the batch seen while refreshing."""

    refreshes_after_step = True

    def __init__(self):
        super().__init__()
        self.refreshing = False
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("refreshed_mean", torch.zeros(()))

    def forward(self, x):
        if self.refreshing:
            self.refreshed_mean.fill_(float(x.mean()))
        return x

    def after_optimizer_step(self):
        self.steps += 1


def test_after_step_refreshes_and_restores_other_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Stateful())
    assert ns.needs_step_hooks(model) and not ns.needs_step_hooks(bn_model())
    x = torch.randn(5, 3, 4, 4)
    running = model[1].running_mean.clone()
    ns.after_step(model, x)
    assert int(model[2].steps) == 1 and not model[2].refreshing
    assert torch.equal(model[1].running_mean, running)  # the refresh forward changed no other buffer
    with torch.no_grad():  # the refresh ran the model in its mode (train: batch statistics) on x
        expected = model[1](model[0](x)).mean()
    model[1].running_mean.copy_(running)
    torch.testing.assert_close(model[2].refreshed_mean, expected)
    with pytest.raises(ValueError, match="needs the batch"):
        ns.after_step(model)
    ns.after_step(bn_model())  # no stateful layer: nothing to do, no input needed


def test_recalibrating_mbn_fills_the_memory_with_population_statistics():
    """Every memory entry (and so running_mean/var and eval) = the exact mean and biased variance
    of the layer's input over all recalibration batches, under the current weights."""
    model = ns.convert(bn_model(), to="mbn", memory=4)
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) + i for i in range(10)]
    mbns = [m for m in model.modules() if isinstance(m, ns.layers.MemorizedBatchNorm)]
    seen = []
    h = mbns[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    ns.recalibrate_bn(model, batches)
    h.remove()
    first = torch.cat(seen[:len(batches)])
    var, mean = torch.var_mean(first, dim=(0, 2, 3), unbiased=False)
    for m in mbns:
        assert bool(m.memory_valid.all())
        assert torch.allclose(m.memory_mean, m.memory_mean[0].expand_as(m.memory_mean))
        assert torch.allclose(m.running_mean, m.memory_mean[0]) and torch.allclose(m.running_var, m.memory_var[0])
    assert torch.allclose(mbns[0].running_mean, mean, atol=1e-5)
    assert torch.allclose(mbns[0].running_var, var, atol=1e-5)
    # a failed recalibration leaves the memory as it was
    before = [b.clone() for b in mbns[1].buffers()]
    with pytest.raises(ValueError):
        ns.recalibrate_bn(model, [batches[0], batches[1][:1]])
    assert all(torch.equal(a, b) for a, b in zip(before, mbns[1].buffers()) if a.dtype.is_floating_point)


def test_mbn_from_an_untrained_batchnorm_starts_with_an_empty_memory():
    fresh = ns.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), to="mbn", memory=4)
    assert not bool(fresh[1].memory_valid.any())
    trained = bn_model()  # randomized running statistics
    trained[1].num_batches_tracked.fill_(5)
    converted = ns.convert(trained, to="mbn", memory=4)
    assert bool(converted[1].memory_valid.all())
    assert torch.allclose(converted[1].memory_mean[2], trained[1].running_mean)


def test_cbn_recalibrates_as_batchnorm_not_through_a_window_of_other_batches():
    """A CBN whose window holds three training batches far from the recalibration data (inputs
    shifted by +3): recalibrate_bn gives the statistics that recalibrating the same weights as
    BatchNorm gives, and leaves the window as it was. Pooling every recalibration batch with those
    three entries (what a train-mode forward does) would shift the second layer's statistics."""
    model = ns.convert(bn_model(), to="cbn", window=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # steps fill the window, weights stay
    for i in range(3):
        x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(100 + i)) + 3.0
        model.train()(x).sum().backward()
        optimizer.step()
        ns.after_step(model, x)
    window = {k: v.clone() for k, v in model.state_dict().items() if ".past_" in k}
    assert window and all(float(v.abs().sum()) > 0 for k, v in window.items() if k.endswith("past_mean"))
    as_bn = ns.convert(bn_model(), to="bn")
    as_bn.load_state_dict({k: v for k, v in model.state_dict().items() if k in as_bn.state_dict()})
    batches = [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ns.recalibrate_bn(model, batches)
    ns.recalibrate_bn(as_bn, batches)
    for name in ("1", "4"):
        for stat in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(model.get_submodule(name), stat),
                                       getattr(as_bn.get_submodule(name), stat), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in window.items())
    # the check can fail: through the window, the second layer sees other statistics
    through_window = copy.deepcopy(model)
    for layer in through_window.modules():
        if isinstance(layer, ns.layers.CrossIterationBatchNorm):
            layer.begin_recalibration = lambda: None
    ns.recalibrate_bn(through_window, batches)
    assert not torch.allclose(through_window[4].running_var, as_bn[4].running_var, rtol=1e-2)
