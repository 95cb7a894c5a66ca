"""The public extension API (register/unregister a target, its types, graph contexts) and the
engine's shared graph analysis (how often a model is traced per conversion)."""
from __future__ import annotations

import importlib.util
import pathlib
import warnings

import pytest
import timm
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.surgery import (Built, SiteInfo, SkipSite, SourceNorm, Transfer, get_target, register_target,
                                 unregister_target)
from normsurgeon.surgery.graph import tracing

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("custom_target", ROOT / "examples" / "custom_target.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_target_example_runs_and_computes_group_rms_norm():
    example = _example()
    new = example.main()
    with pytest.raises(ValueError, match="unknown target 'group_rms'"):
        get_target("group_rms")  # the example unregistered it
    layer = new.layer1[0].bn1
    assert isinstance(layer, example.GroupRMSNorm)
    assert isinstance(new.layer2[0].downsample[1], nn.BatchNorm2d)  # a shortcut norm: kept (context)
    x = torch.randn(2, 64, 5, 5)
    g = x.reshape(2, 8, 8, 5, 5)  # 8 groups of 8 channels
    rms = g.pow(2).mean(dim=(2, 3, 4), keepdim=True).add(layer.eps).sqrt()
    expected = (g / rms).reshape_as(x) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)


def test_types_of_the_extension_api_come_from_one_place():
    import normsurgeon.surgery as surgery
    for name in ("Built", "SiteInfo", "SourceNorm", "Transfer", "SkipSite", "register_target", "unregister_target",
                 "activation_context", "shortcut_context", "producer_context", "GraphContext"):
        assert name in surgery.__all__ and hasattr(surgery, name)
    assert ns.unregister_target is unregister_target


def test_unregister_target_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="no target 'nope' is registered; registered targets: bn"):
        unregister_target("nope")


def _drop_act(source: SourceNorm, site: SiteInfo, options: dict) -> Built:
    module = nn.BatchNorm2d(source.num_channels)  # forgets source.act
    return Transfer(source, module).affine().statistics().exact("no")


def test_a_target_that_drops_a_fused_activation_is_warned_about_by_site():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU), nn.Conv2d(8, 8, 1),
                          timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    register_target("toy_drop_act", _drop_act, summary="toy: forgets the fused activation")
    try:
        with pytest.warns(UserWarning, match=r"dropped the activation fused into 2 timm NormAct layer\(s\) \(1, 3\)"):
            new = ns.convert(model, to="toy_drop_act", input_size=(3, 8, 8))
        rows = {r.name: r for r in new.normsurgeon_report.rows}
        assert "act (SiLU)" in rows["1"].dropped and "act (ReLU)" in rows["3"].dropped
        assert not any(d.startswith("act") for d in rows["5"].dropped)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a built-in target keeps the activation: no warning
            ns.convert(model, to="gn", num_groups=2, input_size=(3, 8, 8))
    finally:
        unregister_target("toy_drop_act")


def test_skip_site_from_a_custom_builder_is_reported():
    def build(source, site, options):
        raise SkipSite("not today")

    register_target("toy_skip", build, summary="toy: skips everything")
    try:
        with pytest.warns(UserWarning, match="left as they were"):
            report = ns.plan(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), to="toy_skip", input_size=(3, 4, 4))
        assert [(r.status, r.reason) for r in report.rows] == [("skipped", "not today")]
    finally:
        unregister_target("toy_skip")


@pytest.mark.parametrize("to", ["gn", "proxy_gn", "cbn", "iebn"])
def test_resnet50_is_traced_at_most_twice_per_conversion(monkeypatch, to):
    """One shared graph analysis: the whole model in train mode (sites), in eval mode only when a
    target reads the activation context; no per-owner traces for ResNet-50 (it was 1 + 42)."""
    roots = []
    original = tracing.NormTracer.trace

    def counting(self, root, *args, **kwargs):
        roots.append(type(root).__name__)
        return original(self, root, *args, **kwargs)

    monkeypatch.setattr(tracing.NormTracer, "trace", counting)
    model = timm.create_model("resnet50")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = ns.convert(model, to=to, input_size=(3, 64, 64))
    assert len(roots) <= 2 and roots.count("ResNet") == len(roots), roots
    if to == "proxy_gn":
        fused = [r for r in new.normsurgeon_report.rows if r.new_type == "ProxyNormAct"]
        assert len(fused) == 33  # bn1 and the first two norms of each of the 16 bottlenecks


class TwoCalls(nn.Module):
    """One BatchNorm module called at two places of the forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv2(torch.relu(self.bn(self.conv1(x)))))


@pytest.mark.parametrize("to, shared_state", [("gn", False), ("bn", True)])
def test_norm_called_at_two_sites_gets_a_report_row_saying_why_it_stays_shared(to, shared_state):
    new = ns.convert(TwoCalls(), to=to, input_size=(3, 4, 4), **({"num_groups": 2} if to == "gn" else {}))
    (row,) = new.normsurgeon_report.rows
    assert row.calls == 2 and row.status == "converted"
    note = next(n for n in row.notes if n.startswith("called 2 times in the forward: kept as one shared module"))
    assert ("batch state" in note) is shared_state
    assert "called 2 times" in new.normsurgeon_report.table()
