"""ns.fold: eval-mode affine norms folded into the conv/linear next to them, checked against the
unfolded eval model, torch's own conv+BN fusion and hand-written formulas; what stays, what is kept
and why; bad input."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import normsurgeon as ns
from normsurgeon import layers, zoo
from normsurgeon.deploy import FoldedAct, InstanceGate

from conftest import randomize_norms

FOLDABLE = ["bn", "frozen_bn", "bgn", "cbn", "mbn", "iebn", "dsbn"]
OPTIONS = {"bgn": {"num_groups": 8}, "dsbn": {"domains": ["photo", "art"]}}
BATCH_INDEPENDENT = ["gn", "ln", "in", "pn", "proxy_gn", "proxy_ln"]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomize_gates(model: nn.Module, seed: int = 1) -> nn.Module:
    """IEBN's gate parameters away from their init (w = 0), so the gate's rewrite is exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, layers.InstanceEnhancementBatchNorm):
            m.attention_weight.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.attention_bias.copy_(torch.randn(m.num_features, generator=gen) - 1)
    return model


def convert(model: nn.Module, to: str) -> nn.Module:
    return randomize_gates(ns.convert(model, to=to, **OPTIONS.get(to, {}))).eval()


@torch.no_grad()
def eval_output(model: nn.Module, x: torch.Tensor, domain=None) -> torch.Tensor:
    if domain is None:
        return model(x)
    with ns.domain(model, domain):
        return model(x)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


BASES = {
    "tv_resnet50": lambda: torchvision.models.resnet50(),
    "tv_mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
    "lite0_embedded": lambda: zoo.efficientnet_lite0(),
}


@pytest.fixture(scope="module", params=list(BASES))
def base(request):
    """Random γ, β and running statistics re-estimated on noise images (random statistics alone let
    the activations of a random ResNet-50 grow to 1e13, where IEBN's gates saturate and float32
    rounding dominates); the embedded Lite0 keeps its real weights and statistics."""
    torch.manual_seed(0)
    model = BASES[request.param]()
    if request.param != "lite0_embedded":
        randomize_norms(model)
        ns.recalibrate_bn(model, torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    return request.param, model.eval()


@pytest.mark.parametrize("to", FOLDABLE)
def test_fold_parity_and_every_norm_folded(base, to):
    """Folded vs unfolded eval model: equal to float64 rounding (< 1e-9 relative). In float32 within
    1e-5 relative, or no farther from the float64 result than twice the unfolded float32 model's own
    distance to it: a 50-layer random ResNet-50 is 3.7e-5 from its float64 self in float32 (folded:
    3.4e-5), and iebn's gates on the real Lite0 weights amplify rounding (1.4e-5; folded: 6e-6)."""
    name, model = base
    converted = convert(model, to)
    domain = "art" if to == "dsbn" else None
    folded = ns.fold(converted, domain=domain)
    report = folded.normsurgeon_fold_report
    assert report.norms_left == 0 and not report.kept, str(report)
    assert len(report.folded) == len(converted.normsurgeon_report.rows)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, layers.DomainSpecificBatchNorm))
                   for m in folded.modules())
    unfolded32, folded32 = eval_output(converted, X, domain), eval_output(folded, X)
    truth = eval_output(converted.double(), X.double(), domain)
    folded64 = eval_output(ns.fold(converted, domain=domain), X.double())
    assert relative_error(folded64, truth) < 1e-9, (name, to)
    error, rounding = relative_error(folded32, unfolded32), relative_error(unfolded32.double(), truth)
    assert error <= 1e-5 or relative_error(folded32.double(), truth) <= 2 * rounding, (name, to, error, rounding)


def test_resnet50_bn_folds_to_zero_norms_and_into_the_right_convs():
    torch.manual_seed(0)
    model = ns.convert(randomize_norms(torchvision.models.resnet50()), to="bn").eval()
    report = ns.fold(model).normsurgeon_fold_report
    assert report.norms_left == 0 and report.left_types == {}
    into = {r.site: (r.into, r.side) for r in report.rows}
    assert into["bn1"] == ("conv1", "producer")
    assert into["layer1.0.bn3"] == ("layer1.0.conv3", "producer")
    assert into["layer1.0.downsample.1"] == ("layer1.0.downsample.0", "producer")
    json.dumps(report.to_dict())
    assert "53 of 53 norm sites folded; 0 norm modules left" in str(report)


def test_float64_parity_is_exact_to_rounding():
    torch.manual_seed(0)
    model = randomize_gates(ns.convert(randomize_norms(torchvision.models.resnet18()), to="iebn")).double().eval()
    folded = ns.fold(model)
    x = X.double()
    assert relative_error(eval_output(folded, x), eval_output(model, x)) < 1e-12
    assert next(folded.parameters()).dtype == torch.float64


def test_producer_fold_matches_torch_conv_bn_fusion():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = randomize_norms(nn.BatchNorm2d(6), seed=3).eval()
    folded = ns.fold(nn.Sequential(conv, bn).eval())
    ref_w, ref_b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                        bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(folded[0].weight, ref_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(folded[0].bias, ref_b, rtol=1e-6, atol=1e-7)
    assert type(folded[1]) is nn.Identity


class PoolThenBN(nn.Module):
    """A BN-neck: pool → flatten → BatchNorm1d → Linear (no layer before the norm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.neck(torch.flatten(self.pool(self.conv(x)), 1)))


def test_consumer_fold_into_linear_matches_the_formula():
    torch.manual_seed(0)
    model = randomize_norms(PoolThenBN(), seed=2).double().eval()
    bn, head = model.neck, model.head
    # by hand: BN is y = (x − μ)·γ/σ + β; head(y) = W·y + b = (W·diag(γ/σ))·x + (b + W·(β − μ·γ/σ))
    g_over_s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    want_w = head.weight * g_over_s[None, :]
    want_b = head.bias + head.weight @ (bn.bias - bn.running_mean * g_over_s)
    folded = ns.fold(model)
    row = folded.normsurgeon_fold_report.rows[0]
    assert (row.status, row.into, row.side) == ("folded", "head", "consumer")
    torch.testing.assert_close(folded.head.weight, want_w, rtol=1e-12, atol=0)
    torch.testing.assert_close(folded.head.bias, want_b, rtol=1e-12, atol=1e-15)
    x = X.double()
    assert relative_error(folded(x), model(x)) < 1e-12


class NormThenConv(nn.Module):
    """A norm on the model input, then a conv (only a consumer can absorb it)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm if norm is not None else nn.BatchNorm2d(conv.in_channels)
        self.conv = conv

    def forward(self, x):
        return self.conv(self.norm(x))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 1, stride=2),
    nn.Conv2d(4, 6, 3, padding=0, dilation=2, groups=2),
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular", groups=4),
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate", bias=False),
], ids=["1x1-stride2", "grouped-dilated-unpadded", "reflect", "circular-depthwise", "replicate-nobias"])
def test_consumer_fold_is_exact_where_padding_allows(conv):
    torch.manual_seed(0)
    model = randomize_norms(NormThenConv(conv), seed=4).double().eval()
    folded = ns.fold(model)
    assert folded.normsurgeon_fold_report.rows[0].side == "consumer"
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert relative_error(folded(x), model(x)) < 1e-12


def test_zero_padded_consumer_is_refused_with_the_reason():
    torch.manual_seed(0)
    model = randomize_norms(NormThenConv(nn.Conv2d(4, 6, 3, padding=1)), seed=4).eval()
    folded = ns.fold(model)
    row = folded.normsurgeon_fold_report.rows[0]
    assert row.status == "kept" and "pads with zeros" in row.reason and "a model input" in row.reason
    assert isinstance(folded.norm, nn.BatchNorm2d)
    assert folded.normsurgeon_fold_report.norms_left == 1


@pytest.mark.parametrize("groups", [1, 2])
def test_producer_fold_into_transposed_and_linear_layers(groups):
    torch.manual_seed(0)
    deconv = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups), nn.BatchNorm2d(6))
    mlp = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU())
    for model, x in ((deconv, torch.randn(2, 4, 5, 5)), (mlp, torch.randn(3, 5))):
        model = randomize_norms(model, seed=5).double().eval()
        folded = ns.fold(model, input_size=tuple(x.shape[1:]))
        assert folded.normsurgeon_fold_report.rows[0].side == "producer"
        assert relative_error(folded(x.double()), model(x.double())) < 1e-12


def test_linear_producer_needs_the_channels_on_its_axis():
    """BatchNorm1d on (N, L, C) normalizes axis 1 (L); a Linear before it acts on C: no fold."""
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Linear(7, 7), nn.BatchNorm1d(7)), seed=6).eval()
    folded = ns.fold(model, input_size=(7, 7))
    row = folded.normsurgeon_fold_report.rows[0]
    assert row.status == "kept" and "the same axis only for 2-d inputs" in row.reason
    x = torch.randn(2, 7, 7)
    torch.testing.assert_close(folded(x), model(x))


class SharedAndBranching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.branch = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_branch = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn_shared(self.conv(x)) + self.conv(x)  # conv called twice
        b = self.branch(x)
        return y + self.bn_branch(b) + b  # the branch conv's output has two users


def test_shared_conv_and_branching_output_are_kept_with_reasons():
    torch.manual_seed(0)
    model = randomize_norms(SharedAndBranching(), seed=7).eval()
    folded = ns.fold(model)
    rows = {r.site: r for r in folded.normsurgeon_fold_report.rows}
    assert rows["bn_shared"].status == "kept" and "called 2 times" in rows["bn_shared"].reason
    assert rows["bn_branch"].status == "kept" and "also used elsewhere" in rows["bn_branch"].reason
    torch.testing.assert_close(folded(X), model(X))


@pytest.mark.parametrize("to", BATCH_INDEPENDENT)
def test_batch_independent_norms_are_not_foldable(to):
    torch.manual_seed(0)
    model = ns.convert(randomize_norms(torchvision.models.resnet18()), to=to).eval()
    folded = ns.fold(model)
    report = folded.normsurgeon_fold_report
    assert not report.folded and report.norms_left == len(report.rows) > 0
    assert all("batch-independent" in r.reason for r in report.rows)
    torch.testing.assert_close(folded(X), model(X), rtol=0, atol=0)


def test_fused_activation_stays_and_drop_path_is_untouched():
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("efficientnet_b0", pretrained=False, drop_path_rate=0.2)).eval()
    folded = ns.fold(model)
    assert isinstance(folded.bn1, FoldedAct) and isinstance(folded.bn1.act, nn.SiLU)
    assert isinstance(folded.blocks[1][0].drop_path, timm.layers.DropPath)
    original = dict(model.named_modules())
    with_act = [type(original[r.site].act) is not nn.Identity for r in folded.normsurgeon_fold_report.rows]
    assert any(with_act) and not all(with_act)  # block outputs (bn3) have no activation
    assert [r.remains == "FoldedAct" for r in folded.normsurgeon_fold_report.rows] == with_act


def test_input_model_untouched_and_module_flags_kept():
    torch.manual_seed(0)
    model = ns.convert(randomize_norms(timm.create_model("resnet18", pretrained=False, drop_rate=0.5)), to="cbn").eval()
    model.fc.train()  # a user's own per-module choice
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    folded = ns.fold(model)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks > 0
    assert folded.fc.training and not folded.training and not folded.layer1.training
    assert sum(len(m._forward_hooks) for m in folded.modules()) == 0  # CBN's conv taps are gone
    assert type(folded) is type(model) and not hasattr(folded, "normsurgeon_recipes")


def test_iebn_gate_stays_and_a_zero_gamma_is_refused():
    torch.manual_seed(0)
    model = randomize_gates(ns.convert(randomize_norms(torchvision.models.resnet18()), to="iebn")).eval()
    folded = ns.fold(model)
    assert isinstance(folded.layer1[0].bn1, InstanceGate)
    assert type(folded.layer2[0].downsample[1]) is nn.Identity  # shortcut norms stay BN: plain fold
    with torch.no_grad():
        model.layer1[0].bn1.weight[3] = 0.0
    row = next(r for r in ns.fold(model).normsurgeon_fold_report.rows if r.site == "layer1.0.bn1")
    assert row.status == "kept" and "γ = 0" in row.reason


class InputNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.act(self.norm(x))))


def test_dsbn_folds_for_the_chosen_domain_and_unfoldable_sites_become_frozen_bn():
    torch.manual_seed(0)
    model = ns.convert(randomize_norms(InputNorm(), seed=8), to="dsbn", domains=["photo", "art"]).eval()
    with torch.no_grad():  # make the two domains differ
        model.bn.running_mean[1].add_(1.0)
        model.norm.running_var[1].mul_(2.0)
    folded = ns.fold(model, domain="art")
    rows = {r.site: r for r in folded.normsurgeon_fold_report.rows}
    assert rows["bn"].status == "folded" and rows["norm"].status == "kept"
    assert "FrozenBatchNorm of domain 'art'" in rows["norm"].remains
    assert isinstance(folded.norm, layers.FrozenBatchNorm)
    out = folded(X)  # no routing needed any more
    assert relative_error(out, eval_output(model, X, "art")) < 1e-5
    assert relative_error(out, eval_output(model, X, "photo")) > 1e-3


def test_bad_input():
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet18())
    with pytest.raises(ValueError, match=r"20 batch-dependent normalization layers are in training mode.*'bn1'.*eval mode.*model\.eval\(\)"):
        ns.fold(model.train())
    model.eval()
    with pytest.raises(ValueError, match="no domain-specific BatchNorm"):
        ns.fold(model, domain="photo")
    dsbn = ns.convert(model, to="dsbn", domains=["photo", "art"]).eval()
    with pytest.raises(ValueError, match=r"domain=\.\.\.\) with one of its domains: 0='photo', 1='art'"):
        ns.fold(dsbn)
    with pytest.raises(ValueError, match=r"unknown domain 'arts'.*Did you mean 'art'"):
        ns.fold(dsbn, domain="arts")
    with pytest.raises(TypeError, match="nn.Module"):
        ns.fold(model.state_dict())
    frozen_in_train = ns.convert(model, to="frozen_bn").train()  # same computation in both modes
    assert ns.fold(frozen_in_train).normsurgeon_fold_report.norms_left == 0


def test_untraceable_model_keeps_every_norm_with_the_reason():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.bn(self.conv(x))

    model = randomize_norms(Untraceable()).eval()
    folded = ns.fold(model)
    row = folded.normsurgeon_fold_report.rows[0]
    assert row.status == "kept" and "could not be traced" in row.reason
    torch.testing.assert_close(folded(X), model(X))


def test_two_norms_in_a_row_both_fold_into_the_conv():
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)), seed=9)
    model = model.double().eval()
    folded = ns.fold(model)
    assert [(r.status, r.into) for r in folded.normsurgeon_fold_report.rows] == [("folded", "0"), ("folded", "0")]
    x = X.double()
    assert relative_error(folded(x), model(x)) < 1e-12


def test_instance_norm_with_running_statistics_is_kept_with_its_own_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True)).eval()
    row = ns.fold(model).normsurgeon_fold_report.rows[0]
    assert row.status == "kept" and "running statistics is an affine map in eval" in row.reason
