"""Batch vs population statistics: effective sample size and |d| against their i.i.d. closed
forms, r and d against a hand computation, and a train/eval gap that leaves no trace."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.diagnostics import Recorder
from normsurgeon.diagnostics.batch_statistics import batch_statistics, train_eval_gap


def identity_bn(c: int) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d that passes its input through unchanged (running 0/1, eps 0)."""
    bn = nn.BatchNorm2d(c, eps=0.0)
    return bn.eval()


def population_of(model: nn.Module, data: torch.Tensor) -> dict:
    model.eval()
    with Recorder(model) as rec, torch.no_grad():
        for chunk in torch.split(data, 256):
            model(chunk)
    return {row.name: (row.mean, row.var) for row in rec.statistics()}


@pytest.mark.parametrize("batch_sizes", [[4, 16]])
def test_iid_effective_sample_size_and_d(batch_sizes):
    c, h, w = 32, 4, 4
    data = torch.randn(2048, c, h, w, generator=torch.Generator().manual_seed(0)) * 2.0 + 3.0
    model = nn.Sequential(identity_bn(c))
    pop = population_of(model, data)
    rows = batch_statistics(model, data, batch_sizes, pop, max_batches=200,
                            generator=torch.Generator().manual_seed(1))
    assert [(r["name"], r["batch_size"]) for r in rows] == [("0", b) for b in batch_sizes]
    for row, b in zip(rows, batch_sizes):
        elements = b * h * w
        assert row["batches"] == 200 and row["elements_per_statistic"] == elements
        assert abs(row["effective_sample_size"] / elements - 1) < 0.10, row
        assert abs(row["ess_ratio"] - 1) < 0.10
        # d ~ N(0, 1/elements): E|d| = sqrt(2/π)/sqrt(elements), E d² = 1/elements
        assert abs(row["d_abs_mean"] / (math.sqrt(2 / math.pi) / math.sqrt(elements)) - 1) < 0.15, row
        assert abs(row["d_rms"] * math.sqrt(elements) - 1) < 0.15
        assert abs(row["r_mean"] - 1) < 0.05 and row["log_r_rms"] < 0.3
        assert row["frac_pathological"] == 0.0 and row["constant_channels"] == 0


def test_spatially_constant_inputs_shrink_effective_sample_size():
    """Every position of an image equal: the mean has only b independent elements, not b·H·W."""
    c, h, w, b = 16, 4, 4, 8
    per_image = torch.randn(2048, c, 1, 1, generator=torch.Generator().manual_seed(2))
    data = per_image.expand(-1, -1, h, w).contiguous()
    model = nn.Sequential(identity_bn(c))
    (row,) = batch_statistics(model, data, [b], population_of(model, data), max_batches=200,
                              generator=torch.Generator().manual_seed(3))
    assert abs(row["effective_sample_size"] / b - 1) < 0.15, row
    assert abs(row["ess_ratio"] - 1 / (h * w)) < 0.15 / (h * w)


def test_r_and_d_match_hand_computation():
    x = np.array([[[[1.0, 2.0]], [[0.5, 0.5]], [[3.0, -1.0]]],
                  [[[0.0, 4.0]], [[0.5, 0.5]], [[2.0, 2.0]]],
                  [[[1.5, -2.0]], [[0.5, 0.5]], [[9.0, 0.0]]],
                  [[[3.0, 1.0]], [[0.5, 0.5]], [[1.0, 1.0]]]])  # (N=4, C=3, H=1, W=2)
    data = torch.from_numpy(x).float()
    model = nn.Sequential(identity_bn(3))
    mu_pop = np.array([0.5, 0.0, 1.0])  # channel 1 off-centre: a leak would show in d
    var_pop = np.array([4.0, 0.0, 0.01])  # channel 1 constant: excluded; channel 2 pathological r
    pop = {"0": (torch.from_numpy(mu_pop), torch.from_numpy(var_pop))}
    b = 2
    rows = batch_statistics(model, data, [b], pop, max_batches=2, generator=torch.Generator().manual_seed(5))
    (row,) = rows
    # the two batches: one permutation of range(4), chunked in two
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(5)).numpy()
    batches = [x[perm[:2]], x[perm[2:]]]
    keep = np.array([0, 2])
    ds, rs, mus = [], [], []
    for xb in batches:
        vals = xb.transpose(1, 0, 2, 3).reshape(3, -1)  # (C, n·positions)
        mu, sd = vals.mean(axis=1), vals.std(axis=1)  # biased
        ds.append(((mu - mu_pop) / np.sqrt(np.where(var_pop > 0, var_pop, 1)))[keep])
        rs.append((sd / np.sqrt(np.where(var_pop > 0, var_pop, 1)))[keep])
        mus.append(mu[keep])
    d, r = np.array(ds), np.array(rs)
    assert row["constant_channels"] == 1 and row["channels"] == 3
    assert row["elements_per_statistic"] == b * 2 and row["batches"] == 2
    np.testing.assert_allclose(row["d_abs_mean"], np.abs(d).mean(), rtol=1e-6)
    np.testing.assert_allclose(row["d_rms"], np.sqrt((d ** 2).mean()), rtol=1e-6)
    np.testing.assert_allclose(row["r_mean"], r.mean(), rtol=1e-6)
    # log r with r clipped to Batch Renorm's [1/3, 3]
    np.testing.assert_allclose(row["log_r_rms"], np.sqrt((np.log(np.clip(r, 1 / 3, 3)) ** 2).mean()), rtol=1e-6)
    patho = (np.abs(d) > 5) | (r < 1 / 3) | (r > 3)
    assert row["frac_pathological"] == pytest.approx(patho.mean())
    assert 0 < row["frac_pathological"] < 1
    var_mu = np.array(mus).var(axis=0, ddof=1)
    fpc = (4 - b) / (4 - 1)  # batches are b-subsets of the N = 4 samples
    # harmonic mean over channels of var_pop / Var(μ_B) (finite-population corrected)
    np.testing.assert_allclose(row["effective_sample_size"], 1 / (var_mu / (var_pop[keep] * fpc)).mean(), rtol=1e-6)
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in row.values())


def test_constant_and_sparse_channels():
    """A dead channel (constant up to float32 rounding) is excluded; a sparse channel that is silent in
    a batch (r = 0) counts as r = 1/3, not as −∞, in log r."""
    gen = torch.Generator().manual_seed(7)
    data = torch.randn(64, 3, 2, 2, generator=gen)
    data[:, 1] = 2.5  # constant
    data[:, 2] = 0.0
    data[::8, 2] = 1.0  # active in one sample of eight: many batches of 4 see none
    model = nn.Sequential(identity_bn(3))
    (row,) = batch_statistics(model, data, [4], population_of(model, data), max_batches=32,
                              generator=torch.Generator().manual_seed(8))
    assert row["constant_channels"] == 1
    assert math.isfinite(row["log_r_rms"]) and row["log_r_rms"] <= math.log(3) + 1e-12
    assert row["frac_pathological"] > 0  # silent batches of the sparse channel are pathological (r < 1/3)


def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Dropout(0.5),
                          timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()  # mismatched with what the data gives
                m.running_var.uniform_(0.2, 5.0)
                m.num_batches_tracked.fill_(7)
    return model


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_train_eval_gap_positive_for_mismatched_bn_and_leaves_model_as_found():
    model = small_bn_net().train()
    model[4].eval()  # a mixed set of flags that must come back as they were
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gaps = train_eval_gap(model, data, 8)
    assert set(gaps) == {"1", "5"}
    assert all(g > 0.05 for g in gaps.values()), gaps
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags
    assert no_hooks(model)


def test_train_eval_gap_zero_without_batch_statistics():
    model = ns.convert(small_bn_net(), to="gn")
    data = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gaps = train_eval_gap(model, data, 8)
    assert len(gaps) == 2
    assert all(g == 0.0 for g in gaps.values()), gaps  # dropout stays in eval: no stochastic noise
    assert no_hooks(model)


def test_batch_statistics_restores_flags_and_hooks():
    model = small_bn_net().train()
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pop = population_of(model, data)
    model.train()
    rows = batch_statistics(model, data, [4], pop, max_batches=4)
    assert {r["name"] for r in rows} == {"1", "5"}
    assert model.training and no_hooks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_errors():
    model = nn.Sequential(identity_bn(2))
    data = torch.randn(5, 2, 3, 3)
    pop = population_of(model, data)
    with pytest.raises(ValueError, match="batch size 8.*only 5"):
        batch_statistics(model, data, [2, 8], pop)
    with pytest.raises(ValueError, match=">= 1"):
        batch_statistics(model, data, [0], pop)
    with pytest.raises(ValueError, match="only 5"):
        train_eval_gap(model, data, 6)
    bad = data.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*NaN"):
        batch_statistics(model, bad, [2], pop)
    with pytest.raises(ValueError, match="non-finite"):
        train_eval_gap(model, bad, 2)
    assert no_hooks(model)
