"""Cross-Iteration BN and Memorized BN layers: the math against independent formulas.

Derivatives against autograd (float64); compensation against statistics recomputed under
the current weights; BatchNorm parity where the methods reduce to it; the double forward
against a recomputation; the state in buffers; errors and the missing-hook warning.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.layers import CrossIterationBatchNorm, MemorizedBatchNorm
from normsurgeon.layers import _stateful
from normsurgeon.layers._conv_statistics import conv_statistics

CONVS = {
    "normal": dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    "strided": dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1),
    "dilated": dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=3, dilation=2),
    "grouped": dict(in_channels=6, out_channels=9, kernel_size=3, padding=2, dilation=2, groups=3),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=5, stride=2, padding=2, groups=6),
    "pointwise": dict(in_channels=6, out_channels=4, kernel_size=1),
    "reflect": dict(in_channels=6, out_channels=8, kernel_size=3, padding=1, padding_mode="reflect"),
    "same": dict(in_channels=6, out_channels=8, kernel_size=4, padding="same"),
}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _stateful._WARNED.clear()
    yield
    _stateful._WARNED.clear()


@pytest.mark.parametrize("size", [(11, 9), (5, 4)])  # small outputs take the unfolded route on CPU
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", list(CONVS))
def test_analytic_derivatives_equal_autograd(kind, bias, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(bias=bias, **CONVS[kind]).double()
    with torch.no_grad():
        conv.weight.add_(0.3)  # a non-zero mean output, so the μ terms matter
    x = torch.randn(3, 6, *size, dtype=torch.float64) + 0.5
    y = conv(x)
    mean, second = y.mean((0, 2, 3)), y.square().mean((0, 2, 3))
    var = y.var((0, 2, 3), unbiased=False)
    stats = conv_statistics(conv, x, y)
    # μ_c depends on W_c only, so the gradient of Σ_c μ_c is the stack of the per-channel ones
    for value, analytic in ((mean, stats.dmean_dweight()), (second, stats.dsecond_moment_dweight()),
                            (var, stats.var_grad)):
        (grad,) = torch.autograd.grad(value.sum(), conv.weight, retain_graph=True)
        assert torch.allclose(analytic, grad, rtol=0, atol=1e-8), (kind, (analytic - grad).abs().max())
    assert torch.allclose(stats.mean, mean, atol=1e-12) and torch.allclose(stats.var, var, atol=1e-12)
    # the layer's call: centered input, results written into preallocated window slots
    out = (torch.full_like(stats.mean_patch, float("nan")), torch.full_like(stats.var_grad, float("nan")))
    into = conv_statistics(conv, x, (y - mean.view(1, -1, 1, 1)).detach(), mean, var, centered=True, out=out)
    assert into.mean_patch is out[0] and into.var_grad is out[1]
    for a, b in ((into.mean_patch, stats.mean_patch), (into.var_grad, stats.var_grad)):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), kind
    if bias:  # ∂μ/∂b = 1, ∂ν/∂b = 2μ: what the layer's offsets use
        (gb,) = torch.autograd.grad(second.sum(), conv.bias)
        assert torch.allclose(gb, 2 * mean, atol=1e-10)


def test_analytic_derivatives_timm_conv2d_same():
    from timm.layers import Conv2dSame
    torch.manual_seed(0)
    conv = Conv2dSame(4, 5, 3, stride=2).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    y = conv(x)
    stats = conv_statistics(conv, x, y)
    (grad,) = torch.autograd.grad(y.square().mean((0, 2, 3)).sum(), conv.weight)
    assert torch.allclose(stats.dsecond_moment_dweight(), grad, atol=1e-8)


def _conv_cbn(window=4, burnin=0, rho=1.0, seed=0, bias=True, dtype=torch.float32):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
    cbn = CrossIterationBatchNorm(6, conv.weight.shape, window=window, burnin=burnin, rho=rho).attach(conv, "0")
    return nn.Sequential(conv, cbn, nn.ReLU(), nn.Conv2d(6, 3, 1)).to(dtype)


def _train(model, batches, lr=0.05, hook=True):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    outs = []
    for x in batches:
        out = model(x)
        outs.append(out.detach().clone())
        loss = (out.square().mean() + out.mean()) if out.ndim > 1 else out.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hook:
            ns.after_step(model, x)
    return outs, opt


@pytest.mark.parametrize("bias", [False, True])
def test_compensation_tracks_the_current_weights(bias):
    """Compensated past statistics are ≥ 5× closer to a recomputation under the current weights
    than the uncompensated ones (ρ = 0), for the window's every entry."""
    model = _conv_cbn(window=5, bias=bias, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64) + 0.3 for _ in range(4)]
    _train(model, batches, lr=0.02)
    conv, cbn = model[0], model[1]
    assert torch.equal(cbn.past_valid, torch.ones(4))
    with torch.no_grad():
        fresh = [conv(x) for x in batches]  # slot i holds batch i (window 5, 4 pushes)
        true_mean = torch.stack([y.mean((0, 2, 3)) for y in fresh])
        true_var = torch.stack([y.var((0, 2, 3), unbiased=False) for y in fresh])
    mean, var, _ = cbn.past_statistics(conv.weight, conv.bias)
    mean0, var0, _ = cbn.past_statistics(conv.weight, conv.bias, rho=0)
    err = lambda m, v: ((m - true_mean).square().sum() + (v - true_var).square().sum()).sqrt()
    stale, compensated = err(mean0, var0), err(mean, var)
    assert stale > 1e-3, "the weights barely moved: the test would prove nothing"
    print("compensation error ratio", float(stale / compensated))
    assert compensated * 5 <= stale, (float(compensated), float(stale))
    # μ is linear in (W, b): its compensation is exact
    assert torch.allclose(mean, true_mean, atol=1e-10)
    # the window's newest entry at unchanged weights needs no compensation at all
    cbn2 = copy.deepcopy(model)
    x = batches[0]
    cbn2.train()(x)
    m2, v2, _ = cbn2[1].past_statistics(cbn2[0].weight, cbn2[0].bias)
    slot = (int(cbn2[1].past_head) - 1) % 4
    with torch.no_grad():
        y = cbn2[0](x)
    assert torch.allclose(m2[slot], y.mean((0, 2, 3)), atol=1e-12)
    assert torch.allclose(v2[slot], y.var((0, 2, 3), unbiased=False), atol=1e-12)


def test_cbn_forward_is_the_pooled_formula():
    model = _conv_cbn(window=3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    _train(model, batches[:2])
    conv, cbn = model[0], model[1]
    mean_p, var_p, _ = cbn.past_statistics(conv.weight, conv.bias)
    y = conv(batches[2])
    out = cbn(y)
    m = torch.cat([y.mean((0, 2, 3))[None].detach(), mean_p])
    nu = torch.cat([y.var((0, 2, 3), unbiased=False)[None].detach(), var_p]) + m.square()
    mu_bar = m.mean(0)
    var_bar = torch.maximum(nu, m.square()).mean(0) - mu_bar.square()  # the paper's ν̄ − μ̄²
    expected = (y - mu_bar.view(1, -1, 1, 1)) / torch.sqrt(var_bar.view(1, -1, 1, 1) + cbn.eps)
    expected = expected * cbn.weight.view(1, -1, 1, 1) + cbn.bias.view(1, -1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-10)


@pytest.mark.parametrize("filled", [0, 1, 3])  # past entries in the window: none, partly, full
@pytest.mark.parametrize("affine", [True, False])
def test_cbn_gradient_is_the_pooled_formula_through_the_current_batch(affine, filled):
    """The layer's closed-form backward equals autograd through the paper's formula, with the
    current batch's μ, ν differentiable and the past entries constant (float64)."""
    model = _conv_cbn(window=4, dtype=torch.float64)
    if not affine:
        conv = model[0]
        model[1] = CrossIterationBatchNorm(6, conv.weight.shape, window=4, affine=False).attach(conv, "0").double()
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    _train(model, batches[:filled])
    conv, cbn = model[0], model[1]
    mean_p, var_p, valid = cbn.past_statistics(conv.weight, conv.bias)
    assert int(valid.sum()) == filled
    mean_p, var_p = mean_p[valid.bool()], var_p[valid.bool()]
    model.zero_grad()
    y = conv(batches[3])
    y.retain_grad()
    upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (cbn(y) * upstream).sum().backward()
    got = [y.grad.clone()] + ([cbn.weight.grad.clone(), cbn.bias.grad.clone()] if affine else [])

    leaf = y.detach().requires_grad_()
    ones, zeros = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    gamma = (cbn.weight.detach().clone() if affine else ones).requires_grad_()
    beta = (cbn.bias.detach().clone() if affine else zeros).requires_grad_()
    m = torch.cat([leaf.mean((0, 2, 3))[None], mean_p])
    nu = torch.cat([(leaf * leaf).mean((0, 2, 3))[None], var_p + mean_p.square()])
    mu_bar = m.mean(0)
    var_bar = torch.maximum(nu, m.square()).mean(0) - mu_bar.square()
    expected = (leaf - mu_bar.view(1, -1, 1, 1)) / torch.sqrt(var_bar.view(1, -1, 1, 1) + cbn.eps)
    expected = expected * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    (expected * upstream).sum().backward()
    for a, b in zip(got, [leaf.grad, gamma.grad, beta.grad]):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), (a - b).abs().max()


def _bn_twin(model):
    """The same conv net with a plain nn.BatchNorm2d in place of the stateful norm."""
    twin = copy.deepcopy(model)
    norm = model[1]
    bn = nn.BatchNorm2d(norm.num_features, norm.eps, norm.momentum).to(norm.weight.dtype)
    bn.load_state_dict({k: v for k, v in norm.state_dict().items()
                        if k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
    twin[1] = bn
    return twin


def _trains_like_its_bn_twin(model, batches):
    """Train ``model`` and its BatchNorm twin on ``batches``: identical outputs and parameters
    (same gradients → same SGD trajectory). Returns the twin."""
    twin = _bn_twin(model)
    outs, _ = _train(model, batches)
    twin_outs, _ = _train(twin, batches)
    for a, b in zip(outs, twin_outs):
        assert torch.equal(a, b)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    return twin


@pytest.mark.parametrize("case", ["window1", "burnin"])
def test_cbn_equals_batchnorm_with_window_one_and_during_burnin(case):
    model = _conv_cbn(window=1) if case == "window1" else _conv_cbn(window=4, burnin=3)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 4, 5, 5, generator=gen) for _ in range(3)]
    twin = _trains_like_its_bn_twin(model, batches)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], key), getattr(twin[1], key)), key
    if case == "burnin":  # past the burn-in the window fills: CBN departs from BN
        x = batches[0]
        assert torch.allclose(model(x), twin(x), atol=1e-6)  # first entry: the window was empty
        assert not torch.allclose(model(batches[1]), twin(batches[1]), atol=1e-3)


def test_mbn_with_memory_one_equals_batchnorm_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), MemorizedBatchNorm(6, memory=1), nn.ReLU(), nn.Conv2d(6, 2, 1))
    gen = torch.Generator().manual_seed(4)
    _trains_like_its_bn_twin(model, [torch.randn(3, 4, 6, 6, generator=gen) for _ in range(3)])


def test_mbn_training_is_the_weighted_pool():
    torch.manual_seed(0)
    mbn = MemorizedBatchNorm(5, memory=3, decay=0.5).double()
    mbn.seed_memory(torch.randn(5).double(), torch.rand(5).double() + 0.5)
    mbn._push(torch.randn(5).double(), torch.rand(5).double() + 0.5)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    means = torch.stack([x.mean((0, 2, 3)), mbn.memory_mean[0], mbn.memory_mean[1]])
    vars_ = torch.stack([x.var((0, 2, 3), unbiased=False), mbn.memory_var[0], mbn.memory_var[1]])
    w = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64) / 1.75
    second = (w[:, None] * (vars_ + means.square())).sum(0)  # the pool of E[x²]
    mu = (w[:, None] * means).sum(0)
    expected = (x - mu.view(1, -1, 1, 1)) / torch.sqrt((second - mu.square()).view(1, -1, 1, 1) + mbn.eps)
    out = mbn.train()(x)
    assert torch.allclose(out, expected * mbn.weight.view(1, -1, 1, 1) + mbn.bias.view(1, -1, 1, 1), atol=1e-10)
    # the batch became the newest entry; eval pools the 3 newest entries with the same weights
    assert torch.allclose(mbn.memory_mean[0], x.mean((0, 2, 3)))
    mean_eval, var_eval = mbn.memorized_statistics()
    assert torch.allclose(mbn.running_mean, mean_eval) and torch.allclose(mbn.running_var, var_eval)


def test_double_forward_refreshes_the_newest_entry():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), MemorizedBatchNorm(6, memory=1), nn.ReLU(),
                          nn.Conv2d(6, 5, 3, bias=False), MemorizedBatchNorm(5, memory=3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(4, 3, 9, 9, generator=gen) for _ in range(3)]
    _train(model, batches, lr=0.1)
    x = batches[-1]
    with torch.no_grad():  # batch x recomputed independently under the updated weights
        y1 = model[0](x)
        h = torch.relu(nn.functional.batch_norm(y1, None, None, model[1].weight, model[1].bias, True, 0.0, 1e-5))
        y2 = model[3](h)
    for mbn, y in ((model[1], y1), (model[4], y2)):
        assert torch.allclose(mbn.memory_mean[0], y.mean((0, 2, 3)), atol=1e-6)
        assert torch.allclose(mbn.memory_var[0], y.var((0, 2, 3), unbiased=False), atol=1e-6)
    # without the refresh the entry would be the pre-step statistics: the test can fail
    stale = copy.deepcopy(model)
    _train(stale, [x], hook=False)
    with torch.no_grad():
        y = stale[0](x)
    assert not torch.allclose(stale[1].memory_mean[0], y.mean((0, 2, 3)), atol=1e-6)


def test_state_lives_in_buffers():
    model = _conv_cbn(window=3, burnin=1)
    _train(model, [torch.randn(2, 4, 5, 5) for _ in range(3)])
    cbn = model[1]
    keys = set(cbn.state_dict())
    assert {"num_steps", "past_mean", "past_var", "past_mean_patch", "past_var_grad", "past_valid",
            "past_head"} <= keys
    assert int(cbn.num_steps) == 3 and cbn._steps == 3
    double = copy.deepcopy(model).double()
    assert double[1].past_var_grad.dtype == torch.float64
    twin = copy.deepcopy(model)
    assert list(twin[0]._forward_hooks.values())[0].layer() is twin[1]  # the copy taps its own conv
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(twin(x), model(x))
    # overhead: k−1 entries of ∂σ²/∂W (|W|) and p̄ (Cin·kh·kw) plus (C,) vectors
    w = model[0].weight
    floats = 2 * (w.numel() + w[0].numel() * 1 + 2 * 6 + 1)
    assert cbn.state_bytes() == floats * 4 + 2 * 8


def test_clamp_keeps_compensated_variance_non_negative():
    model = _conv_cbn(window=3, dtype=torch.float64)
    _train(model, [torch.randn(2, 4, 5, 5, dtype=torch.float64) for _ in range(2)])
    conv, cbn = model[0], model[1]
    with torch.no_grad():
        conv.weight.mul_(-3.0).add_(torch.randn_like(conv.weight))  # far outside the Taylor regime
    _, var, _ = cbn.past_statistics(conv.weight, conv.bias)
    assert (var >= 0).all()
    out = model(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_errors_are_clear():
    with pytest.raises(ValueError, match="window"):
        CrossIterationBatchNorm(4, (4, 2, 3, 3), window=0)
    with pytest.raises(ValueError, match="rho"):
        CrossIterationBatchNorm(4, (4, 2, 3, 3), rho=-1)
    with pytest.raises(ValueError, match="memory"):
        MemorizedBatchNorm(4, memory=0)
    model = _conv_cbn(window=2)
    with pytest.raises(ValueError, match="batch of 2"):
        model(torch.randn(1, 4, 1, 1))
    with pytest.raises(RuntimeError, match="conv's output"):
        model[1](torch.randn(2, 6, 4, 4))  # not the conv's output
    with pytest.raises(ValueError, match="batch of 2"):
        MemorizedBatchNorm(3, memory=2)(torch.randn(1, 3))


def test_forgotten_step_hook_is_warned_once():
    model = _conv_cbn(window=3, burnin=5)
    model[1].step_hook_patience = 3
    x = torch.randn(2, 4, 5, 5)
    with pytest.warns(UserWarning, match=r"normsurgeon\.after_step") as record:
        for _ in range(6):
            model(x).sum().backward()
    assert sum("after_step" in str(w.message) for w in record) == 1
    mbn = nn.Sequential(nn.Conv2d(4, 3, 1), MemorizedBatchNorm(3, memory=2), MemorizedBatchNorm(3, memory=2))
    for m in mbn[1:]:
        m.step_hook_patience = 2
    with pytest.warns(UserWarning, match="Memorized") as record:
        for _ in range(4):
            mbn(x).sum().backward()
    assert len([w for w in record if "Memorized" in str(w.message)]) == 1
    fine = _conv_cbn(window=3, burnin=5)  # with the hook: silent
    fine[1].step_hook_patience = 2
    _stateful._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(fine, [x] * 4)


def test_mbn_gradient_is_batchnorm_through_the_current_batch():
    """Memory = the batch's own statistics: value and gradient are BatchNorm's (the literal
    derivative of the pool would scale the statistics' gradient by w_0 = 1/4)."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64) * 3 + 1
    mbn = MemorizedBatchNorm(5, memory=4).double()
    with torch.no_grad():
        mbn.weight.uniform_(0.5, 1.5)
        mbn.bias.uniform_(-1, 1)
    mbn.seed_memory(x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))
    g = torch.randn_like(x)
    a = x.clone().requires_grad_()
    out = mbn.train()(a)
    (out * g).sum().backward()
    b = x.clone().requires_grad_()
    ref = nn.functional.batch_norm(b, None, None, mbn.weight, mbn.bias, True, 0.0, mbn.eps)
    (ref * g).sum().backward()
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.allclose(a.grad, b.grad, atol=1e-10)
    # memory ≠ batch: the gradient is BatchNorm's scaled by r = σ_0/σ̄ (Batch Renormalization)
    mbn.seed_memory(torch.zeros(5, dtype=torch.float64), torch.full((5,), 4.0, dtype=torch.float64))
    a.grad = None
    (mbn(a) * g).sum().backward()
    var0 = x.var((0, 2, 3), unbiased=False)
    mean0 = x.mean((0, 2, 3))
    # pooled mixture variance of {(μ_0, σ²_0), 3 × (0, 4)} with weights 1/4
    mu = mean0 / 4
    pooled_var = (var0 + 12.0) / 4 + (0.25 * (mean0 - mu).square() + 0.75 * mu.square())
    r = torch.sqrt((var0 + mbn.eps) / (pooled_var + mbn.eps)).view(1, -1, 1, 1)
    assert torch.allclose(a.grad, b.grad * r, atol=1e-10)


def _separable(seed=0, n=512, classes=10):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    centers = torch.randn(classes, 3, 8, 8, generator=gen)
    return centers[y] + torch.randn(n, 3, 8, 8, generator=gen), y


def test_mbn_trains_about_as_fast_as_batchnorm():
    """Regression: with the literal derivative of the pool (the current batch's statistics'
    gradient scaled by 1/4) this net stayed at loss 1.69 where BN and MBN now reach 0.25."""
    x, y = _separable()

    def run(norm, batch=32):
        torch.manual_seed(0)
        layers, c = [], 3
        for _ in range(4):
            layers += [nn.Conv2d(c, 16, 3, padding=1, bias=False), norm(16), nn.ReLU()]
            c = 16
        model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        losses = []
        for epoch in range(3):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
            for i in range(0, len(x), batch):
                xb, yb = x[order[i:i + batch]], y[order[i:i + batch]]
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                ns.after_step(model, xb)
                losses.append(float(loss.detach()))
        return sum(losses[-len(losses) // 3:]) / (len(losses) // 3)  # last epoch's mean loss

    bn, mbn = run(nn.BatchNorm2d), run(lambda c: MemorizedBatchNorm(c, memory=4))
    assert bn < 0.4
    assert mbn < bn + 0.15, (bn, mbn)


@pytest.mark.parametrize("to", ["cbn", "mbn"])
def test_channels_last_model_trains_like_the_contiguous_one(to):
    """``model.to(memory_format=torch.channels_last)`` works (no 5-d state) and gives the same steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    options = {"window": 3} if to == "cbn" else {"memory": 3}
    model = ns.convert(net, to=to, input_size=(3, 12, 12), **options)
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 12, 12, generator=gen) for _ in range(4)]
    outs, _ = _train(model, batches)
    twin_outs, _ = _train(twin, [x.contiguous(memory_format=torch.channels_last) for x in batches])
    for a, b in zip(outs, twin_outs):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("to", ["cbn", "mbn"])
def test_trains_under_bfloat16_autocast_with_float32_statistics(to):
    """Under CPU bf16 autocast the layers train, and CBN's window holds float32 derivatives of the
    (bf16) conv output, computed as in float32 (autocast would otherwise run its matmuls in bf16)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    options = {"window": 3} if to == "cbn" else {"memory": 3}
    model = ns.convert(net, to=to, input_size=(3, 5, 5), **options)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    autocast_seen = []  # was autocast on while CBN compensated its window? (its dots must be fp32)
    if to == "cbn":
        compensated = model[1]._compensated
        model[1]._compensated = lambda *a: autocast_seen.append(torch.is_autocast_enabled("cpu")) or compensated(*a)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model[0](x)
            out = model[3:](model[2](model[1](y)))
        assert y.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
        loss = out.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ns.after_step(model, x)
    if to == "cbn":
        assert autocast_seen == [False] * 3
        cbn, conv = model[1], model[0]
        slot = (cbn._head - 1) % 2  # the newest entry: this last batch under the weights before the step
        assert cbn.past_var_grad.dtype == torch.float32
        # recompute it in float32 from the same bf16 output (weights before the last step)
        before = copy.deepcopy(conv)
        with torch.no_grad():
            for p, g in zip(before.parameters(), (conv.weight.grad, conv.bias.grad)):
                p.add_(0.05 * g)
        stats = conv_statistics(before, x, y.float())
        assert torch.allclose(cbn.past_var_grad[slot], stats.var_grad.flatten(1), rtol=1e-5, atol=1e-6)
        # the public reading of the window is the same with autocast on
        plain = cbn.past_statistics(conv.weight, conv.bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = cbn.past_statistics(conv.weight, conv.bias)
        for a, b in zip(plain, autocast):
            assert torch.equal(a, b)


@pytest.mark.parametrize("size", [5, 9])  # conv outputs of 25 and 81 positions: both derivative routes
def test_bfloat16_conv_feeds_a_float32_window(size):
    """A bf16 model whose norms are kept in float32 (a common idiom) trains with cbn, and the
    window's entry is the derivative of the bf16 conv's output computed in float32."""
    model = _conv_cbn(window=3).bfloat16()
    model[1].float()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 4, size, size, generator=gen).bfloat16() for _ in range(3)]
    outs, _ = _train(model, batches[:2], lr=0.0)  # lr 0: the weights that made the entries stay
    assert all(bool(torch.isfinite(o.float()).all()) for o in outs)
    conv, cbn = model[0], model[1]
    assert cbn.past_var_grad.dtype == torch.float32 and int(cbn.past_valid.sum()) == 2
    with torch.no_grad():
        y = conv(batches[1])
    expected = conv_statistics(copy.deepcopy(conv).float(), batches[1].float(), y.float())
    scale = expected.var_grad.abs().max()
    assert torch.allclose(cbn.past_var_grad[1], expected.var_grad.flatten(1), rtol=0, atol=1e-5 * scale)
