"""BatchGroupNorm and InstanceEnhancementBatchNorm against independent numpy float64 formulas.

The references below are written from the equations (module docstring of
``normsurgeon/layers/batch_group_norm.py``), not from the implementation: groups are taken as
explicit channel slices, statistics with numpy, running statistics as BatchNorm defines them
(EMA with ``momentum``, cumulative average for ``momentum=None``, unbiased running variance).
Also: BGN with G = C against torch's BatchNorm, bad inputs, torch.compile / torch.export of
the layers and of converted models, and gradcheck.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn

import normsurgeon
from normsurgeon import layers

EPS = 1e-5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_input(shape, seed: int) -> torch.Tensor:
    """float64 input with a non-zero mean and a per-channel scale, so statistics differ per channel."""
    g = gen(seed)
    scale = (torch.rand(shape[1], generator=g, dtype=torch.float64) * 2 + 0.3).view((1, -1) + (1,) * (len(shape) - 2))
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.7


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


class NumpyRunningStats:
    """BatchNorm running statistics for K statistics, in float64."""

    def __init__(self, mean: np.ndarray, var: np.ndarray, momentum: float | None):
        self.mean, self.var, self.momentum, self.batches = mean.copy(), var.copy(), momentum, 0

    def update(self, batch_mean: np.ndarray, batch_var_biased: np.ndarray, count: int) -> None:
        self.batches += 1
        factor = 1.0 / self.batches if self.momentum is None else self.momentum
        unbiased = batch_var_biased * count / (count - 1)
        self.mean = (1 - factor) * self.mean + factor * batch_mean
        self.var = (1 - factor) * self.var + factor * unbiased


class NumpyBGN:
    """Batch Group Norm: G contiguous groups of C/G channels, statistics over N·(C/G)·P values."""

    def __init__(self, num_channels, num_groups, weight, bias, running_mean, running_var, momentum, eps=EPS):
        self.c, self.g, self.eps = num_channels, num_groups, eps
        self.weight, self.bias = weight, bias
        self.stats = NumpyRunningStats(running_mean, running_var, momentum)

    def groups(self):
        size = self.c // self.g
        return [slice(k * size, (k + 1) * size) for k in range(self.g)]

    def _affine(self, x_hat):
        return x_hat * per_channel(self.weight, x_hat.ndim) + per_channel(self.bias, x_hat.ndim)

    def train_step(self, x: np.ndarray) -> np.ndarray:
        x_hat = np.empty_like(x)
        means, variances = np.empty(self.g), np.empty(self.g)
        for k, chans in enumerate(self.groups()):
            values = x[:, chans]  # (N, C/G, *positions): every value of the group in the batch
            means[k] = values.mean()
            variances[k] = ((values - means[k]) ** 2).mean()
            x_hat[:, chans] = (values - means[k]) / np.sqrt(variances[k] + self.eps)
        count = x.shape[0] * (self.c // self.g) * int(np.prod(x.shape[2:]))
        self.stats.update(means, variances, count)
        return self._affine(x_hat)

    def eval_step(self, x: np.ndarray) -> np.ndarray:
        x_hat = np.empty_like(x)
        for k, chans in enumerate(self.groups()):
            x_hat[:, chans] = (x[:, chans] - self.stats.mean[k]) / np.sqrt(self.stats.var[k] + self.eps)
        return self._affine(x_hat)


class NumpyIEBN:
    """IEBN: y = BN_no_affine(x) · γ · sigmoid(w · mean_positions(x) + b) + β."""

    def __init__(self, weight, bias, att_w, att_b, running_mean, running_var, momentum, eps=EPS):
        self.weight, self.bias, self.att_w, self.att_b, self.eps = weight, bias, att_w, att_b, eps
        self.stats = NumpyRunningStats(running_mean, running_var, momentum)

    def _output(self, x, x_hat):
        context = x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)  # (N, C)
        gate = sigmoid(self.att_w[None, :] * context + self.att_b[None, :])
        gate = gate.reshape(gate.shape + (1,) * (x.ndim - 2))
        return x_hat * per_channel(self.weight, x.ndim) * gate + per_channel(self.bias, x.ndim)

    def train_step(self, x):
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x.mean(axis=axes)
        var = ((x - per_channel(mean, x.ndim)) ** 2).mean(axis=axes)
        x_hat = (x - per_channel(mean, x.ndim)) / np.sqrt(per_channel(var, x.ndim) + self.eps)
        self.stats.update(mean, var, x.size // x.shape[1])
        return self._output(x, x_hat)

    def eval_step(self, x):
        x_hat = (x - per_channel(self.stats.mean, x.ndim)) / np.sqrt(per_channel(self.stats.var, x.ndim) + self.eps)
        return self._output(x, x_hat)


def np_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().copy()


@torch.no_grad()
def random_bgn(c: int, g: int, momentum, seed: int = 1) -> layers.BatchGroupNorm:
    m = layers.BatchGroupNorm(c, g, momentum=momentum).double()
    r = gen(seed)
    m.weight.copy_(torch.rand(c, generator=r, dtype=torch.float64) + 0.5)
    m.bias.copy_(torch.randn(c, generator=r, dtype=torch.float64))
    m.running_mean.copy_(torch.randn(g, generator=r, dtype=torch.float64) * 0.3)
    m.running_var.copy_(torch.rand(g, generator=r, dtype=torch.float64) + 0.5)
    return m


@torch.no_grad()
def random_iebn(c: int, momentum, seed: int = 2) -> layers.InstanceEnhancementBatchNorm:
    m = layers.InstanceEnhancementBatchNorm(c, momentum=momentum).double()
    r = gen(seed)
    m.weight.copy_(torch.rand(c, generator=r, dtype=torch.float64) + 0.5)
    m.bias.copy_(torch.randn(c, generator=r, dtype=torch.float64))
    m.attention_weight.copy_(torch.randn(c, generator=r, dtype=torch.float64))
    m.attention_bias.copy_(torch.randn(c, generator=r, dtype=torch.float64))
    m.running_mean.copy_(torch.randn(c, generator=r, dtype=torch.float64) * 0.3)
    m.running_var.copy_(torch.rand(c, generator=r, dtype=torch.float64) + 0.5)
    return m


def numpy_bgn_of(m: layers.BatchGroupNorm) -> NumpyBGN:
    return NumpyBGN(m.num_channels, m.num_groups, np_of(m.weight), np_of(m.bias),
                    np_of(m.running_mean), np_of(m.running_var), m.momentum)


def numpy_iebn_of(m: layers.InstanceEnhancementBatchNorm) -> NumpyIEBN:
    return NumpyIEBN(np_of(m.weight), np_of(m.bias), np_of(m.attention_weight), np_of(m.attention_bias),
                     np_of(m.running_mean), np_of(m.running_var), m.momentum)


def check_running(module, ref, batches: int) -> None:
    np.testing.assert_allclose(np_of(module.running_mean), ref.stats.mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np_of(module.running_var), ref.stats.var, rtol=0, atol=1e-6)
    assert int(module.num_batches_tracked) == batches == ref.stats.batches


SHAPES = [(4, 6, 5, 3), (3, 8, 7), (2, 12, 4, 4)]
BGN_CASES = [(shape, g) for shape in SHAPES for g in sorted({1, 2, 3, shape[1]}) if shape[1] % g == 0]


# ---------------------------------------------------------------------------- BatchGroupNorm

@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("shape,groups", BGN_CASES, ids=[f"{s}-G{g}" for s, g in BGN_CASES])
def test_bgn_train_eval_and_running_stats_match_numpy(shape, groups, momentum):
    m = random_bgn(shape[1], groups, momentum)
    ref = numpy_bgn_of(m)
    assert m.running_mean.shape == (groups,)
    m.train()
    for step in range(3):
        x = rand_input(shape, seed=10 + step) * (1 + step)  # statistics change between batches
        y = m(x)
        np.testing.assert_allclose(np_of(y), ref.train_step(np_of(x)), rtol=0, atol=1e-6)
        check_running(m, ref, step + 1)
    m.eval()
    x = rand_input(shape, seed=99)
    np.testing.assert_allclose(np_of(m(x)), ref.eval_step(np_of(x)), rtol=0, atol=1e-6)
    check_running(m, ref, 3)  # eval does not touch the running statistics


def test_bgn_groups_are_contiguous_channel_blocks():
    """Changing channel 2 alone changes the outputs of its group (channels 2, 3) only."""
    m = layers.BatchGroupNorm(6, 3, affine=False).double().train()
    x = rand_input((4, 6, 3, 3), seed=3)
    y = m(x)
    x2 = x.clone()
    x2[:, 2] = x2[:, 2] * 5 + 7  # (a map of the whole group would normalize away)
    y2 = m(x2)
    torch.testing.assert_close(y2[:, :2], y[:, :2])
    torch.testing.assert_close(y2[:, 4:], y[:, 4:])
    assert not torch.allclose(y2[:, 3], y[:, 3])  # channel 3 untouched, but its group's statistics moved


def torch_bn_for(shape, momentum):
    return (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1], momentum=momentum).double()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", SHAPES)
def test_bgn_with_one_channel_per_group_is_batch_norm(shape, momentum):
    c = shape[1]
    ours = random_bgn(c, c, momentum)
    bn = torch_bn_for(shape, momentum)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(ours, name))
    g = gen(5)
    for step in range(2):
        for mode in (True, False):
            ours.train(mode), bn.train(mode)
            x = rand_input(shape, seed=20 + step)
            grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
            outputs = []
            for layer in (ours, bn):
                xi = x.clone().requires_grad_()
                y = layer(xi)
                grads = torch.autograd.grad(y, (xi, layer.weight, layer.bias), grad_out)
                outputs.append((y,) + grads)
            for a, b, what in zip(*outputs, ("output", "input grad", "weight grad", "bias grad")):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=f"{what} ({'train' if mode else 'eval'})")
            torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(ours.running_var, bn.running_var, rtol=0, atol=1e-12)
            assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked)
    assert int(bn.num_batches_tracked) == 2


def test_bgn_without_running_stats_uses_batch_statistics_in_eval():
    m = layers.BatchGroupNorm(6, 2, track_running_stats=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2, 6, dtype=torch.float64))
    ref = NumpyBGN(6, 2, np_of(m.weight), np_of(m.bias), np.zeros(2), np.ones(2), 0.1)
    x = rand_input((4, 6, 5, 3), seed=4)
    expected = ref.train_step(np_of(x))
    for mode in (True, False):
        np.testing.assert_allclose(np_of(m.train(mode)(x)), expected, rtol=0, atol=1e-6)
    assert m.running_mean is None


# ------------------------------------------------------------------ InstanceEnhancementBatchNorm

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", SHAPES)
def test_iebn_train_eval_and_running_stats_match_numpy(shape, momentum):
    m = random_iebn(shape[1], momentum)
    ref = numpy_iebn_of(m)
    m.train()
    for step in range(3):
        x = rand_input(shape, seed=30 + step) * (1 + step)
        np.testing.assert_allclose(np_of(m(x)), ref.train_step(np_of(x)), rtol=0, atol=1e-6)
        check_running(m, ref, step + 1)
    m.eval()
    x = rand_input(shape, seed=98)
    np.testing.assert_allclose(np_of(m(x)), ref.eval_step(np_of(x)), rtol=0, atol=1e-6)
    check_running(m, ref, 3)


def test_iebn_gate_is_per_sample():
    """Sample n's output depends on its own context: scaling one sample changes its gate only."""
    m = random_iebn(6, 0.1).eval()
    x = rand_input((3, 6, 4, 4), seed=6)
    y = m(x)
    x2 = x.clone()
    x2[1] += 3.0
    y2 = m(x2)
    torch.testing.assert_close(y2[[0, 2]], y[[0, 2]])
    # With a fixed gate, +3 on the input would shift each channel of y[1] by a constant; the
    # gate moved with sample 1's spatial mean, so the change varies across positions.
    change = (y2[1] - y[1]).flatten(1)
    assert (change.std(dim=1) > 1e-3).all()


# ------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("make,shape", [
    (lambda **kw: layers.BatchGroupNorm(6, 6, **kw), (1, 6, 1, 1)),
    (lambda **kw: layers.BatchGroupNorm(6, 6, **kw), (1, 6, 1)),
    (lambda **kw: layers.BatchGroupNorm(6, 6, **kw), (1, 6)),
    (lambda **kw: layers.InstanceEnhancementBatchNorm(6, **kw), (1, 6, 1, 1)),
    (lambda **kw: layers.InstanceEnhancementBatchNorm(6, **kw), (1, 6, 1)),
], ids=["bgn-4d", "bgn-3d", "bgn-2d", "iebn-4d", "iebn-3d"])
def test_one_value_per_statistic_is_a_clear_error_in_train_only(make, shape):
    layer = make()
    layer.site_name = "stage2.bn1"
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"stage2\.bn1.*needs batch statistics.*one value per statistic"):
        layer.train()(x)
    assert int(layer.num_batches_tracked) == 0  # nothing was updated by the failed call
    y = layer.eval()(x)  # running statistics: fine
    assert y.shape == x.shape and torch.isfinite(y).all()
    # without running statistics, eval uses batch statistics too: the same error
    no_stats = make(track_running_stats=False)
    with pytest.raises(ValueError, match="needs batch statistics"):
        no_stats.eval()(x)


def test_bgn_single_sample_is_fine_when_a_group_holds_several_values():
    # (1, 6, 1, 1) with G = 3: each statistic is over 2 channels.
    m = layers.BatchGroupNorm(6, 3).double().train()
    x = rand_input((1, 6, 1, 1), seed=7)
    ref = NumpyBGN(6, 3, np.ones(6), np.zeros(6), np.zeros(3), np.ones(3), 0.1)
    np.testing.assert_allclose(np_of(m(x)), ref.train_step(np_of(x)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("c,g", [(6, 4), (6, 12), (6, 0), (8, 3)])
def test_bgn_num_groups_must_divide_channels(c, g):
    with pytest.raises(ValueError, match="must divide"):
        layers.BatchGroupNorm(c, g)


def test_wrong_channel_count_is_a_value_error():
    with pytest.raises(ValueError, match="expects 6 channels"):
        layers.BatchGroupNorm(6, 2)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="expects"):
        layers.InstanceEnhancementBatchNorm(6)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="positions"):
        layers.InstanceEnhancementBatchNorm(6)(torch.randn(2, 6))


# ----------------------------------------------------------------- torch.compile / export

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # no recompile limit carried over from other tests
    yield
    torch._dynamo.reset()


def float_layers():
    bgn = random_bgn(8, 2, 0.1).float()
    iebn = random_iebn(8, 0.1).float()
    return {"bgn": bgn, "iebn": iebn}


@pytest.mark.parametrize("name", ["bgn", "iebn"])
def test_layer_compiles_in_eval(name, fresh_dynamo):
    layer = float_layers()[name].eval()
    x = torch.randn(4, 8, 6, 6, generator=gen(8))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=1e-5)
    x2 = torch.randn(3, 8, 5, 5, generator=gen(9))  # another shape: recompiles or dynamic, still right
    torch.testing.assert_close(compiled(x2), layer(x2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["bgn", "iebn"])
def test_layer_compiles_in_train_with_momentum_and_updates_stats(name, fresh_dynamo):
    eager = float_layers()[name].train()
    other = float_layers()[name].train()
    compiled = torch.compile(other, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 8, 6, 6, generator=gen(40 + step)) * (step + 1)
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(other.running_mean, eager.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(other.running_var, eager.running_var, rtol=0, atol=1e-6)
    assert int(other.num_batches_tracked) == 2


@pytest.mark.parametrize("name", ["bgn", "iebn"])
def test_layer_momentum_none_compiles_in_train_with_a_graph_break_like_batch_norm(name, fresh_dynamo):
    """momentum=None needs 1/num_batches_tracked as a Python float, exactly as nn.BatchNorm2d
    does (a data-dependent .item(): no fullgraph, no export in train mode, for both)."""
    make = {"bgn": lambda: layers.BatchGroupNorm(8, 2, momentum=None),
            "iebn": lambda: layers.InstanceEnhancementBatchNorm(8, momentum=None)}[name]
    eager, other = make().train(), make().train()
    compiled = torch.compile(other, backend="aot_eager")
    for step in range(3):
        x = torch.randn(4, 8, 6, 6, generator=gen(50 + step)) * (step + 1)
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(other.running_mean, eager.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(other.running_var, eager.running_var, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["bgn", "iebn"])
def test_layer_exports_in_eval_with_a_dynamic_batch(name):
    layer = float_layers()[name].eval()
    x = torch.randn(4, 8, 6, 6, generator=gen(10))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    for n in (4, 1, 7):
        xn = torch.randn(n, 8, 6, 6, generator=gen(11 + n))
        torch.testing.assert_close(program.module()(xn), layer(xn), rtol=0, atol=1e-5)


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def resnet18() -> nn.Module:
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@torch.no_grad()
def converted(make_model, to: str, **options) -> nn.Module:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iebn leaves 1-position sites (layer4 at 32x32) as they were
        model = normsurgeon.convert(make_model(), to=to, input_size=(3, 32, 32), **options)
    kind = layers.BatchGroupNorm if to == "bgn" else layers.InstanceEnhancementBatchNorm
    assert sum(isinstance(m, kind) for m in model.modules()) >= 2
    gen_ = gen(12)
    for m in model.modules():
        if isinstance(m, layers.InstanceEnhancementBatchNorm):  # make the gate depend on the input
            m.attention_weight.copy_(torch.randn(m.attention_weight.shape, generator=gen_))
    model.train()
    for step in range(2):  # non-trivial running statistics
        model(torch.randn(8, 3, 32, 32, generator=gen(60 + step)))
    return model.eval()


MODELS = {"small": small_net, "resnet18": resnet18}
CONVERSIONS = [("bgn", {"num_groups": 2}), ("iebn", {})]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("to,options", CONVERSIONS, ids=[c[0] for c in CONVERSIONS])
def test_converted_model_compiles_in_eval(to, options, model_name, fresh_dynamo):
    model = converted(MODELS[model_name], to, **options)
    x = torch.randn(2, 3, 32, 32, generator=gen(13))
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("to,options", CONVERSIONS, ids=[c[0] for c in CONVERSIONS])
def test_converted_model_exports_in_eval(to, options, model_name):
    model = converted(MODELS[model_name], to, **options)
    x = torch.randn(2, 3, 32, 32, generator=gen(14))
    program = torch.export.export(model.eval(), (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-5)
    x2 = torch.randn(2, 3, 32, 32, generator=gen(15))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), model(x2), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- gradcheck

def gradcheck_module(module: nn.Module, x: torch.Tensor) -> None:
    params = dict(module.named_parameters())
    names = list(params)

    def fn(x, *values):
        return torch.func.functional_call(module, dict(zip(names, values)), (x,))
    inputs = (x.requires_grad_(),) + tuple(p.detach().clone().requires_grad_() for p in params.values())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("shape", [(3, 4, 3, 2), (2, 4, 5)])
def test_bgn_gradcheck_train(shape, groups):
    gradcheck_module(random_bgn(4, groups, 0.1).train(), rand_input(shape, seed=16))


@pytest.mark.parametrize("shape", [(3, 4, 3, 2), (2, 4, 5)])
def test_iebn_gradcheck_train(shape):
    gradcheck_module(random_iebn(4, 0.1).train(), rand_input(shape, seed=17))
