"""Required behaviour of convert/plan, each on its own: class, untouched input, train/eval,
fused acts, leaves, state_dict keys, fallbacks, reports and function preservation."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import normsurgeon as ns
from normsurgeon import layers

from conftest import randomize_norms

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict, types_before: list) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert [type(m) for m in model.modules()] == types_before


@pytest.fixture(scope="module")
def effnet():
    """timm EfficientNet-B0 (fused BatchNormAct2d with SiLU, drop path), randomized stats."""
    torch.manual_seed(0)
    return randomize_norms(timm.create_model("efficientnet_b0", num_classes=10, drop_rate=0.3,
                                             drop_path_rate=0.2)).eval()


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_new_model_same_class_methods_work_and_input_untouched(effnet):
    before, types = snapshot(effnet), [type(m) for m in effnet.modules()]
    new = ns.convert(effnet, to="gn")
    assert isinstance(new, type(effnet)) and new is not effnet
    assert new.pretrained_cfg == effnet.pretrained_cfg
    new.set_grad_checkpointing(False)
    assert [i["module"] for i in new.feature_info] == [i["module"] for i in effnet.feature_info]
    assert_unchanged(effnet, before, types)
    assert count(new, nn.BatchNorm2d) == 0 and count(effnet, nn.BatchNorm2d) > 0
    new.reset_classifier(5)
    assert new(X64[:, :, :32, :32]).shape == (2, 5)
    assert effnet.get_classifier().out_features == 10


def test_inplace_modifies_and_returns_the_same_object():
    model = timm.create_model("resnet18", num_classes=4)
    out = ns.convert(model, to="gn", inplace=True)
    assert out is model and count(model, nn.BatchNorm2d) == 0


@pytest.mark.parametrize("to", ["bn", "frozen_bn"])
def test_bn_and_frozen_bn_are_function_preserving_in_eval(effnet, to):
    new = ns.convert(effnet, to=to).eval()
    with torch.no_grad():
        ref, out = effnet(X64), new(X64)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    assert all(r.exact in ("train+eval", "eval") for r in new.normsurgeon_report.converted)


def test_bn_is_function_preserving_in_train_mode_too():
    torch.manual_seed(1)
    model = randomize_norms(timm.create_model("resnet18", num_classes=4))
    new = ns.convert(model, to="bn")
    model.train(), new.train()
    torch.testing.assert_close(new(X64), model(X64), atol=1e-5, rtol=1e-5)
    for (k, a), b in zip(model.state_dict().items(), new.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)  # running statistics updated identically


def test_train_eval_behaviour_survives_conversion(effnet):
    new = ns.convert(effnet, to="gn")
    new.train()
    torch.manual_seed(0)
    a = new(X64)
    torch.manual_seed(1)
    b = new(X64)
    assert not torch.allclose(a, b), "dropout / drop path must stay stochastic in train mode"
    new.eval()
    torch.manual_seed(0)
    c = new(X64)
    torch.manual_seed(1)
    assert torch.equal(c, new(X64)), "eval mode must be deterministic"
    bn_new = ns.convert(effnet, to="bn")
    bn_new.eval()
    one = bn_new(X64[:1])
    bn_new.train()
    bn_new.drop_path_rate = 0.0
    for m in bn_new.modules():
        if isinstance(m, nn.Dropout) or type(m).__name__ == "DropPath":
            m.p = m.drop_prob = 0.0
    mixed = bn_new(torch.cat([X64[:1], X64[1:] * 5]))[:1]
    assert not torch.allclose(one, mixed, atol=1e-3), "train-mode BN must use batch statistics"


def test_fused_activation_survives(effnet):
    new = ns.convert(effnet, to="gn", fold_statistics=False)
    src, dst = effnet.bn1, new.bn1
    assert type(src.act) is nn.SiLU and type(dst.act) is nn.SiLU
    x = torch.randn(2, src.num_features, 4, 4)
    gn = nn.GroupNorm(dst.num_groups, dst.num_channels, eps=dst.eps)
    gn.load_state_dict({"weight": src.weight, "bias": src.bias})
    torch.testing.assert_close(dst(x), F.silu(gn(x)))


def test_norms_inside_fx_leaf_modules_are_converted():
    model = timm.create_model("mobilevit_xxs", num_classes=3)
    new = ns.convert(model, to="gn")
    report = new.normsurgeon_report
    assert count(new, nn.BatchNorm2d) == 0 and count(new, nn.LayerNorm) == 0
    assert report.counts() == {"converted": count(model, nn.BatchNorm2d) + count(model, nn.LayerNorm)}
    leaves = {n.split("'")[1] for r in report.converted for n in r.notes if "inside leaf module" in n}
    assert leaves and {type(model.get_submodule(m)).__name__ for m in leaves} == {"MobileVitBlock"}
    new.train()(torch.randn(2, 3, 64, 64)).sum().backward()


def test_state_dict_keys_are_stable_and_reload_strictly(effnet):
    new = ns.convert(effnet, to="gn", num_groups=8)
    old_keys, new_keys = set(effnet.state_dict()), set(new.state_dict())
    stats = {k for k in old_keys if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert new_keys == old_keys - stats
    fresh = ns.convert(timm.create_model("efficientnet_b0", num_classes=10), to="gn", num_groups=8)
    fresh.load_state_dict(new.state_dict(), strict=True)
    twin = copy.deepcopy(new).eval()
    new.eval()
    torch.testing.assert_close(twin(X64), new(X64))
    assert twin.normsurgeon_report.summary() == new.normsurgeon_report.summary()


def test_save_and_load_rebuild_the_model(tmp_path, effnet):
    new = ns.convert(ns.convert(effnet, to="frozen_bn", include="blocks.0.*"), to="gn",
                     exclude=["blocks.0.*"])
    path = tmp_path / "m.pt"
    ns.save(new, path)
    blob = torch.load(path, weights_only=True)
    assert [r["to"] for r in blob["recipes"]] == ["frozen_bn", "gn"]
    again = ns.load(path, timm.create_model("efficientnet_b0", num_classes=10))
    assert type(again.blocks[0][0].bn1) is layers.FrozenBatchNorm and type(again.bn1) is layers.GroupNorm
    new.eval(), again.eval()
    torch.testing.assert_close(again(X64), new(X64))
    with pytest.raises(ValueError, match="saved from a EfficientNet"):
        ns.load(path, timm.create_model("resnet18"))
    with pytest.raises(ValueError, match="not made by normsurgeon"):
        ns.save(effnet, tmp_path / "x.pt")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.mean() > 10:  # data-dependent control flow: FX cannot trace this
            x = x * 0
        return self.bn(self.conv(x))


def test_untraceable_model_falls_back_to_module_swap_with_a_warning():
    model = Untraceable()
    with pytest.warns(UserWarning, match=r"could not trace.*test_convert.py:\d+.*x.mean\(\) > 10"):
        new = ns.convert(model, to="gn")
    assert type(new.bn) is layers.GroupNorm
    assert "module swap" in new.normsurgeon_report.table()


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Untraceable()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.inner(x))


def test_untraceable_submodule_becomes_a_leaf_and_tracing_continues():
    with pytest.warns(UserWarning) as caught:
        new = ns.convert(Outer(), to="in")
    messages = [str(w.message) for w in caught]
    assert not any("could not trace" in m for m in messages)  # no fallback: only the submodule was leafed
    # its `if x.mean() > 10` cannot run on meta tensors either: the conversion says it is unverified
    assert len(messages) == 1 and "could not be verified" in messages[0] and "x.mean() > 10" in messages[0]
    report = new.normsurgeon_report
    assert report.trace["ok"] and "inner" in report.trace["leaves_added"]
    assert {r.name for r in report.converted} == {"inner.bn", "bn"}


class OwnForwardBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class PlainSubclassBN(nn.BatchNorm2d):
    pass


def test_unknown_batchnorm_subclass_with_own_forward_is_reported_not_converted():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), OwnForwardBN(4), nn.Conv2d(4, 4, 1), PlainSubclassBN(4))
    with pytest.warns(UserWarning, match="left as they were"):
        new = ns.convert(model, to="gn")
    assert type(new[1]) is OwnForwardBN and type(new[3]) is layers.GroupNorm
    row = {r.name: r for r in new.normsurgeon_report.rows}
    assert row["1"].status == "unsupported" and "register_source(OwnForwardBN" in row["1"].reason
    assert row["3"].status == "converted" and "does not override forward" in row["3"].notes[0]
    ns.register_source(OwnForwardBN, like=nn.BatchNorm2d)
    try:
        assert ns.plan(model, to="gn").rows[0].status == "planned"
    finally:
        from normsurgeon.surgery import sources
        sources._READERS.pop(OwnForwardBN)


def test_unknown_target_lists_targets_and_closest_name():
    with pytest.raises(ValueError, match=r"unknown target 'gnn'.*Did you mean 'gn'.*frozen_bn"):
        ns.convert(nn.BatchNorm2d(3), to="gnn")


def test_groups_that_do_not_divide_name_the_layer():
    model = timm.create_model("resnet18")
    with pytest.raises(ValueError, match=r"num_groups=5 does not divide the 64 channels of 'bn1'"):
        ns.convert(model, to="gn", num_groups=5)
    with pytest.raises(ValueError, match="group_size=7"):
        ns.convert(model, to="gn", group_size=7)
    ok = ns.convert(model, to="gn", num_groups=5, overrides={"*": {"num_groups": 8}})
    assert {m.num_groups for m in ok.modules() if isinstance(m, nn.GroupNorm)} == {8}


def test_model_without_norm_warns_and_reports_zero_sites():
    with pytest.warns(UserWarning, match="no normalization layer"):
        new = ns.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), to="gn")
    assert new.normsurgeon_report.rows == []


def test_non_module_argument_is_a_type_error():
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got dict"):
        ns.convert({"weight": torch.ones(3)}, to="gn")
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        ns.plan("resnet50", to="gn")


def test_include_exclude_that_match_nothing_warn():
    model = timm.create_model("resnet18")
    with pytest.warns(UserWarning, match="include pattern 'layer9.*' matches no"):
        new = ns.convert(model, to="gn", include="layer9.*")
    assert new.normsurgeon_report.counts() == {"excluded": 20}
    with pytest.warns(UserWarning, match="exclude pattern 'nope' matches no"):
        ns.convert(model, to="gn", exclude=["nope"])


def test_include_exclude_overrides_select_sites():
    model = timm.create_model("resnet18")
    new = ns.convert(model, to="gn", include=["layer1.*", "layer2.*"], exclude="*downsample*",
                     overrides={"layer2.*": {"to": "frozen_bn"}})
    assert type(new.layer1[0].bn1) is layers.GroupNorm
    assert type(new.layer2[0].bn1) is layers.FrozenBatchNorm
    assert type(new.layer2[0].downsample[1]) is nn.BatchNorm2d and type(new.bn1) is nn.BatchNorm2d


def test_unknown_option_is_a_type_error_with_a_suggestion():
    with pytest.raises(TypeError, match=r"unknown option 'num_group'.*Did you mean 'num_groups'"):
        ns.convert(timm.create_model("resnet18"), to="gn", num_group=8)


def test_plan_reports_without_converting():
    model = timm.create_model("resnet18")
    before, types = snapshot(model), [type(m) for m in model.modules()]
    report = ns.plan(model, to="gn")
    assert_unchanged(model, before, types)
    n_bn = count(model, nn.BatchNorm2d)
    assert report.counts() == {"planned": n_bn}
    text = str(report)
    assert "layer4.1.bn2" in text and "dropped running_mean, running_var, num_batches_tracked" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["sites"]) == n_bn and data["sites"][0]["transferred"] == ["weight", "bias"]


def test_register_target_with_a_toy_target():
    class Scale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(c))

        def forward(self, x):
            return x * self.weight.view(1, -1, *([1] * (x.ndim - 2)))

    def build(source, site, options):
        module = Scale(source.num_channels)
        with torch.no_grad():
            module.weight.copy_(source.weight * options.get("gain", 1.0))
        return ns.surgery.Built(module, transferred=["weight"], dropped=["bias"])

    ns.register_target("scale_only", build, summary="toy: per-channel scale", options=("gain",))
    try:
        assert "scale_only" in ns.available_targets()
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        new = ns.convert(model, to="scale_only", gain=2.0)
        torch.testing.assert_close(new[1].weight, model[1].weight * 2)
        with pytest.raises(ValueError, match="already registered"):
            ns.register_target("scale_only", build, summary="again")
    finally:
        ns.surgery.unregister_target("scale_only")
    assert "scale_only" not in ns.available_targets()


def test_in_skips_sites_with_a_single_position():
    model = timm.create_model("convnext_atto", num_classes=3)
    with pytest.warns(UserWarning, match="left as they were"):
        new = ns.convert(model, to="in")
    row = {r.name: r for r in new.normsurgeon_report.rows}["head.norm"]
    assert row.status == "skipped" and "one position" in row.reason
    new.train()(torch.randn(2, 3, 64, 64)).sum().backward()


def test_transformer_layernorm_to_pn_is_exact():
    model = randomize_norms(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)).eval()
    new = ns.convert(model, to="pn").eval()
    assert new.no_weight_decay() == model.no_weight_decay() and new.num_prefix_tokens == 1
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(new(x), model(x))
    assert {r.exact for r in new.normsurgeon_report.converted} == {"train+eval"}


def test_torchvision_frozen_bn_backbone():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d
    backbone = randomize_norms(resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                                   norm_layer=FrozenBatchNorm2d, trainable_layers=5))
    new = ns.convert(backbone, to="frozen_bn").eval()
    x = torch.randn(1, 3, 64, 64)
    for k, v in backbone.eval()(x).items():
        torch.testing.assert_close(new(x)[k], v)
    gn = ns.convert(backbone, to="gn")
    assert count(gn, FrozenBatchNorm2d) == 0
    out = gn.train()(torch.randn(1, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()


class FunctionalNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.layer_norm(x, x.shape[1:])


def test_functional_norm_call_that_cannot_be_read_is_an_unsupported_site():
    with pytest.warns(UserWarning, match="left as they were"):
        report = ns.plan(FunctionalNorm(), to="gn")
    row = next(r for r in report.rows if r.name == "layer_norm_0")
    assert row.status == "unsupported" and "normalized_shape is computed in the forward" in row.reason


def test_shared_norm_module_converted_once_under_every_name():
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    new = ns.convert(model, to="gn")
    assert new[1] is new[3] and type(new[1]) is layers.GroupNorm
    row = new.normsurgeon_report.rows[0]
    assert row.calls == 2 and row.aliases == ["3"]


def test_frozen_parameters_stay_frozen_and_dtype_follows():
    model = timm.create_model("resnet18").double()
    model.bn1.weight.requires_grad_(False)
    new = ns.convert(model, to="gn")
    assert new.bn1.weight.dtype == torch.float64 and not new.bn1.weight.requires_grad
    assert new.layer1[0].bn1.weight.requires_grad


# bn, bgn and iebn share the statistics logic (PendingStatistics, cumulative momentum);
# bgn with one group per channel is BatchNorm exactly, in train too
BATCH_STAT_TARGETS = {"bn": {}, "bgn": {"num_groups": 8}, "iebn": {}}


def small_net(norm) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), norm())


@pytest.mark.parametrize("to", list(BATCH_STAT_TARGETS))
def test_meta_checks_leave_statistics_pending_and_the_first_batch_sets_them(to):
    """GN has no batch statistics: the new layers are pending after convert's meta checks, and
    the first real training batch makes the running statistics that batch's statistics."""
    torch.manual_seed(0)
    new = ns.convert(small_net(lambda: nn.GroupNorm(2, 8)), to=to, input_size=(3, 16, 16),
                     **BATCH_STAT_TARGETS[to]).train()
    norms = [m for m in new.modules() if hasattr(m, "statistics_pending")]
    assert len(norms) == 2 and all(m.statistics_pending for m in norms)
    inputs = {}
    for m in norms:
        m.register_forward_hook(lambda mod, args, out: inputs.__setitem__(mod, args[0].detach()))
    new(torch.randn(4, 3, 16, 16) * 3 + 1)
    for m in norms:
        x = inputs[m]
        var, mean = torch.var_mean(x.transpose(0, 1).reshape(8, -1), dim=1, correction=1)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)
        assert not m.statistics_pending and int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("to", list(BATCH_STAT_TARGETS))
def test_bn_with_cumulative_momentum_converts_and_is_function_preserving_in_train(to):
    """momentum=None (cumulative average): convert's meta checks must not read
    num_batches_tracked, and the new model keeps averaging exactly as the original."""
    torch.manual_seed(0)
    model = small_net(lambda: nn.BatchNorm2d(8, momentum=None)).train()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 16, 16, generator=gen) * (1 + k) + k for k in range(5)]
    for x in batches[:3]:
        model(x)
    new = ns.convert(model, to=to, input_size=(3, 16, 16), **BATCH_STAT_TARGETS[to]).train()
    assert all(m.momentum is None for m in new.modules() if hasattr(m, "statistics_pending"))
    for x in batches[3:]:
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)
    for old, fresh in zip((model[1], model[4]), (new[1], new[4])):
        torch.testing.assert_close(fresh.running_mean, old.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fresh.running_var, old.running_var, rtol=1e-5, atol=1e-6)
        assert int(fresh.num_batches_tracked) == int(old.num_batches_tracked) == 5
    model.eval(), new.eval()
    torch.testing.assert_close(new(batches[0]), model(batches[0]), rtol=1e-5, atol=1e-5)


def test_per_module_train_eval_flags_survive_conversion():
    """A stage frozen with model.layer1.eval() stays in eval: in the copy, and in the model itself with inplace."""
    for inplace in (False, True):
        model = timm.create_model("resnet18").train()
        model.layer1.eval()
        flags = {name: m.training for name, m in model.named_modules()}
        new = ns.convert(model, to="gn", inplace=inplace)
        after = {name: m.training for name, m in new.named_modules()}
        assert {name: after[name] for name in flags} == flags  # (the new norms add act/drop children)
        assert not any(after[name] for name in after if name.startswith("layer1."))
        if not inplace:
            assert {name: m.training for name, m in model.named_modules()} == flags
