"""``diagnose`` and ``DiagnosticsReport``: tables in depth order, a model left untouched, a
self-contained HTML report, flags that fire on real failure modes, and clear errors."""
from __future__ import annotations

import copy
import json
import re

import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

import normsurgeon as ns
from normsurgeon.diagnostics import DiagnosticsReport, Recorder
from normsurgeon.diagnostics.flags import compute_flags


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Precise BN running statistics on x (cumulative average), so that eval-mode BN really normalizes."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    model(x)
    return model.eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    layers, c = [], 3
    for width in (8, 16, 16):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bn_model(x):
    return calibrate(resnet(), x)


@pytest.fixture(scope="module")
def ln_report(x, bn_model):
    """An LN conversion of a random-init ResNet-18 against a calibrated BN reference."""
    ln = ns.convert(resnet(), to="ln")
    return ns.diagnose(ln, x, reference=bn_model)


def test_layers_in_depth_order_with_every_site(x, bn_model):
    report = ns.diagnose(bn_model, x, batch_size=5)  # chunks of 5, 5, 5, 1
    with Recorder(bn_model) as rec, torch.no_grad():
        bn_model(x)
    expected = [s.name for s in rec.statistics()]
    assert isinstance(report, DiagnosticsReport)
    assert len(report.layers) == len(expected) == 20
    assert list(report.layers["name"]) == expected
    assert list(report.layers["depth"]) == list(range(20))
    assert (report.layers["instances"] == 16).all()
    for col in ("A", "B", "W", "f_A", "f_B", "f_W", "cv_sigma", "nonfinite", "module_type", "channels"):
        assert col in report.layers.columns
    assert (report.layers["nonfinite"] == 0).all()
    assert report.batch.empty
    # an iterable of (x, y) batches is the same data
    again = ns.diagnose(bn_model, [(x[:7], None), (x[7:], None)])
    pd.testing.assert_series_equal(again.layers["f_A"], report.layers["f_A"], rtol=1e-4, atol=1e-7)


def test_model_and_reference_left_untouched(x):
    model, ref = ns.convert(resnet(), to="ln"), resnet()
    model.train()
    model.layer2.eval()  # a mixed state must come back as it was
    ref.train()
    before = {n: copy.deepcopy(m.state_dict()) for n, m in (("model", model), ("ref", ref))}
    flags = {n: [mod.training for mod in m.modules()] for n, m in (("model", model), ("ref", ref))}
    ns.diagnose(model, x, reference=ref, batch_sizes=[2, 4], max_batches=4)
    ns.diagnose(ref, x, batch_sizes=[2], max_batches=4)  # BN sites: the train/eval gap runs in train mode
    for name, m in (("model", model), ("ref", ref)):
        after = m.state_dict()
        assert after.keys() == before[name].keys()
        for k, v in before[name].items():
            assert torch.equal(after[k], v), (name, k)
        assert [mod.training for mod in m.modules()] == flags[name]


def test_save_writes_self_contained_html_json_and_pngs(tmp_path, ln_report):
    paths = ln_report.save(tmp_path / "out")
    assert paths[0] == tmp_path / "out" / "report.html"
    assert sorted(p.name for p in paths) == sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["flags.png", "power.png", "report.html", "report.json"]  # every file written, and only those
    page = paths[0].read_text()
    assert page.count("data:image/png;base64,") == 2  # power plot and flags heatmap (no batch sweep)
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "<script" not in outside_images and "http:" not in outside_images  # nothing fetched
    assert "layer4.1.bn2" in page and "Summary" in page
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    names = list(ln_report.layers["name"])
    assert [row["name"] for row in data["layers"]] == names
    assert set(data["channel_stats"]) == set(names)
    assert len(data["channel_stats"]["layer4.1.bn2"]["mean"]) == 512
    assert data["flags"] and data["summary"] == ln_report.summary()
    for png in ("power.png", "flags.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(ln_report.to_dict(), allow_nan=False)


def test_layer_norm_channel_collapse_is_flagged(ln_report):
    layers = ln_report.layers
    assert {"ref_f_A", "f_A_ratio", "ref_f_B", "f_B_ratio", "ref_cv_sigma", "cv_sigma_ratio"} <= set(layers.columns)
    collapsed = layers[(layers["f_A"] > 0.5) & (layers["f_A_ratio"] >= 1.1)]["name"]
    assert len(collapsed) >= 10  # LN leaves per-channel offsets in place; calibrated BN removes them
    flagged = ln_report.flagged("channel_collapse")
    assert set(flagged) == set(collapsed)
    assert (layers.set_index("name").loc[flagged, "ref_f_A"] < 0.1).all()
    text = ln_report.summary()
    assert "Channel collapse in" in text and "LayerNorm layers" in text and "proxy_ln" in text
    assert "BatchNorm" not in text  # the sites are LayerNorms: the text names them, not the reference's norm
    assert flagged[0] in text


def test_collapse_not_flagged_when_the_reference_collapses_too(x):
    model = resnet()  # random-init BN with default running stats (0, 1) is an identity in eval
    report = ns.diagnose(ns.convert(model, to="ln"), x, reference=model)
    assert (report.layers["f_A"] > 0.5).sum() >= 10
    assert not report.flagged("channel_collapse")
    alone = ns.diagnose(ns.convert(model, to="ln"), x)  # no reference: the threshold alone
    assert len(alone.flagged("channel_collapse")) == (alone.layers["f_A"] > 0.5).sum()


def test_instance_norm_variance_failure_is_flagged(x):
    ref = calibrate(small_cnn(), x)
    report = ns.diagnose(ns.convert(ref, to="in"), x, reference=ref)
    assert (report.layers["f_B"] < 1e-6).all()
    flags = report.flags
    assert set(flags[flags["metric"] == "f_B"]["name"]) == set(report.layers["name"])
    assert set(flags[flags["metric"] == "cv_sigma"]["name"]) == set(report.layers["name"])
    text = report.summary()
    assert "Instance-variance failure in 3 InstanceNorm layers" in text and all(n in text for n in report.layers["name"])
    assert "'gn'" in text  # what to do names a norm that keeps instance statistics


def test_nonfinite_activations_flag_the_layer_and_still_report(tmp_path, x):
    model = small_cnn()
    with torch.no_grad():
        model[1].weight[0] = float("inf")  # the first BN's channel 0 overflows
    report = ns.diagnose(model, x)
    row = report.layers.set_index("name").loc["1"]
    assert row["nonfinite"] > 0
    # the inf propagates: every layer from the first BN on holds NaN/inf, and each is flagged as such
    assert report.flagged("degenerate") == list(report.layers[report.layers["nonfinite"] > 0]["name"])
    assert report.flagged("degenerate")[0] == "1"
    assert "NaN/inf values: 1" in report.summary()
    report.save(tmp_path)
    json.loads((tmp_path / "report.json").read_text())


def test_batch_size_sweep_end_to_end(tmp_path, x, bn_model):
    pytest.importorskip("normsurgeon.diagnostics.batch_statistics")
    report = ns.diagnose(bn_model, x, batch_sizes=[4, 2], max_batches=8, generator=torch.Generator().manual_seed(0))
    batch = report.batch
    assert len(batch) == 2 * len(report.layers)
    for col in ("name", "batch_size", "d_abs_mean", "d_rms", "r_mean", "log_r_rms", "frac_pathological",
                "effective_sample_size", "ess_ratio", "elements_per_statistic", "train_eval_gap"):
        assert col in batch.columns, col
    assert batch[batch["batch_size"] == 2]["train_eval_gap"].notna().all()
    assert batch[batch["batch_size"] == 4]["train_eval_gap"].isna().all()
    # layer4 runs at 1x1 here: 2 elements per statistic at batch 2 is hopeless
    noisy = report.flags[report.flags["kind"] == "noisy_batch_statistics"]
    assert {"layer4.0.bn1", "layer4.1.bn2"} <= set(noisy[noisy["batch_size"] == 2]["name"])
    text = report.summary()
    assert "Noisy batch statistics at batch 2" in text and "bgn" in text and "proxy_gn" in text
    paths = report.save(tmp_path)
    assert (tmp_path / "batch_sweep.png") in paths
    assert paths[0].read_text().count("data:image/png;base64,") == 3
    # no BN site: nothing to sweep, and the report says so
    ln = ns.diagnose(ns.convert(resnet(), to="ln"), x, batch_sizes=[2], max_batches=2)
    assert ln.batch.empty and "no site uses batch statistics" in ln.summary()


def test_compute_flags_rules():
    """Each rule at the sites whose norm can have the failure mode; degenerate layers get only their own flag."""
    layers = pd.DataFrame({
        "name": ["a", "b", "c", "d", "e", "f", "g"], "depth": range(7), "positions": [4, 4, 1, 4, 4, 4, 4],
        "norm": ["layer", "group", "instance", "batch", "batch", "batch", "instance"],
        "A": [9.0, 1.0, 1.0, 9.0, 0.0, 2.0, 1.0], "B": [0.5, 0.0005, 0.0, 0.5, 0.0, 0.0, 1.0],
        "W": [0.5, 0.9995, 1.0, 0.5, 0.0, 0.0, 1.0],
        "f_A": [0.9, 0.5, 0.5, 0.9, 0.0, 1.0, 1 / 3], "f_B": [0.05, 0.00025, 0.0, 0.05, 0.0, 0.0, 1 / 3],
        "cv_sigma": [0.3, 0.3, 0.0, 0.01, 0.0, 0.0, 0.3], "nonfinite": [0, 0, 0, 0, 0, 0, 3],
        "ref_f_A": [0.1, 0.85, 0.1, 0.9, 0.1, 0.1, 0.1], "ref_f_B": [0.2, 0.2, 0.0, 0.2, 0.2, 0.2, 0.2],
        "ref_cv_sigma": [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]})
    batch = pd.DataFrame({"name": ["d", "d", "e"], "batch_size": [2, 32, 2], "effective_sample_size": [4.0, 80.0, 1.0]})
    flags = compute_flags(layers, batch)
    got = {(r.name, r.kind, r.metric, None if pd.isna(r.batch_size) else int(r.batch_size)) for r in flags.itertuples()}
    assert got == {
        ("a", "channel_collapse", "f_A", None),            # LayerNorm: 0.9 > 0.5 and 9x its reference
        ("b", "instance_variance", "f_B", None),           # GroupNorm: f_B 0.00025 < 0.001 and reference 800x larger
        ("d", "noisy_batch_statistics", "effective_sample_size", 2),  # ESS 4 < 30; at 32 (80) fine
        ("e", "degenerate", "zero_output", None),          # no power at all: nothing else is judged
        ("f", "degenerate", "constant_output", None),      # power only in the channel means: constant output
        ("g", "degenerate", "nonfinite", None),
    }
    # c: an InstanceNorm's exact f_B = 0 is flagged only where its reference has instance variance;
    # here the reference's f_B is 0 too (and its CV_σ is undefined at one position)
    # d: a BatchNorm's f_A 0.9 and CV_σ 0.01 are what its learned β, γ make of the data, not a failure mode
    assert set(flags[flags["name"] == "a"]["norm"]) == {"layer"}
    # without a reference the thresholds alone decide, still per family
    alone = compute_flags(layers.drop(columns=["ref_f_A", "ref_f_B", "ref_cv_sigma"]))
    assert set(alone[alone["metric"] == "f_A"]["name"]) == {"a"}
    assert set(alone[alone["metric"] == "f_B"]["name"]) == {"b", "c"}
    assert set(alone[alone["metric"] == "cv_sigma"]["name"]) == set()  # c has one position: undefined
    # a table without families (older reports): every rule everywhere
    legacy = compute_flags(layers.drop(columns=["norm", "ref_f_A", "ref_f_B", "ref_cv_sigma"]))
    assert "d" in set(legacy[legacy["metric"] == "f_A"]["name"])


def test_zero_gamma_layers_are_degenerate_not_instance_failures(x):
    """timm zero-initialises the last BN of each residual block (γ = 0): those layers output 0. They are
    flagged as degenerate with their own wording, not as an InstanceNorm failure."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    report = ns.diagnose(model, x)
    zero = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not m.weight.any()]
    assert len(zero) == 8
    assert report.flagged("degenerate") == zero
    assert not report.flagged("instance_variance") and not report.flagged("channel_collapse")
    text = report.summary()
    assert "Degenerate output in 8 BatchNorm layers" in text and "zero-initialises" in text
    assert "InstanceNorm" not in text


def test_errors(x, bn_model):
    with pytest.raises(TypeError):
        ns.diagnose("resnet18", x)
    with pytest.raises(TypeError):
        ns.diagnose(bn_model, x, reference=object())
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ns.diagnose(bn_model, bad)
    with pytest.raises(ValueError, match="fewer than the smallest batch size 32"):
        ns.diagnose(bn_model, x, batch_sizes=[32, 64])
    with pytest.raises(ValueError, match="empty"):
        ns.diagnose(bn_model, x[:0])


def test_missing_batch_statistics_module_degrades_gracefully(monkeypatch, x):
    import sys
    monkeypatch.setitem(sys.modules, "normsurgeon.diagnostics.batch_statistics", None)  # import → ImportError
    with pytest.warns(RuntimeWarning, match="batch sweep skipped"):
        report = ns.diagnose(small_cnn(), x, batch_sizes=[2])
    assert report.batch.empty and len(report.layers) == 3
    assert "batch-size sweep skipped" in report.summary()
