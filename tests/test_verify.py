"""convert's checks before install: each new module on meta tensors at the shapes of its site.

Checks run once per distinct computation (class, settings, tensor shapes) and input shape; a
layer's name (CBN's conv name) does not make it distinct, a setting does. The shape probe passes the
norm sites' shapes through after checking their channels, which must record the same shapes as
running them, and fail where running them fails.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.surgery import pipeline
from normsurgeon.surgery.graph.probe import meta_forward
from normsurgeon.surgery import Built, ConversionError, register_target, unregister_target
from normsurgeon.surgery.graph.sites import _shape_rules, find_sites


class Picky(nn.Module):
    """Shape-preserving unless ``fail`` is set: then its forward raises."""

    def __init__(self, channels: int, fail: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.fail = fail

    def forward(self, x):
        if self.fail:
            raise RuntimeError("this layer does not fit")
        return x * self.weight.view(1, -1, 1, 1)


def two_blocks() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def test_a_module_that_does_not_fit_its_site_stops_the_conversion_and_changes_nothing():
    register_target("toy_wrong_channels", lambda source, site, options: Built(nn.GroupNorm(1, source.num_channels + 1)),
                    summary="a GroupNorm with one channel too many")
    try:
        model = two_blocks()
        before = [type(m) for m in model]
        with pytest.raises(ConversionError, match=r"at '1' does not fit its call site.*input model is unchanged"):
            ns.convert(model, to="toy_wrong_channels", inplace=True, input_size=(3, 8, 8))
        assert [type(m) for m in model] == before
    finally:
        unregister_target("toy_wrong_channels")


def test_modules_with_the_same_shapes_but_another_setting_are_each_checked():
    """The second site's layer differs from the first only in a setting that breaks its forward: a
    check keyed on class and shapes alone would pass it."""
    built = iter([False, True])
    register_target("toy_picky", lambda source, site, options: Built(Picky(source.num_channels, next(built))),
                    summary="fails at its second site")
    try:
        with pytest.raises(ConversionError, match=r"at '4' does not fit its call site.*this layer does not fit"):
            ns.convert(two_blocks(), to="toy_picky", input_size=(3, 8, 8))
    finally:
        unregister_target("toy_picky")


def test_layers_that_differ_only_in_their_names_are_checked_once(monkeypatch):
    """Two CBN layers (conv names '0' and '3') of the same shapes at sites of the same shapes: one
    train + eval check; the report still counts both calls."""
    calls = []
    original = pipeline.check_on_meta

    def counting(module, *args, **kwargs):
        calls.append(module.conv_name)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(pipeline, "check_on_meta", counting)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    new = ns.convert(model, to="cbn", input_size=(8, 8, 8))
    assert [new[1].conv_name, new[4].conv_name] == ["0", "3"]
    assert len(calls) == 1
    assert new.normsurgeon_report.verify.startswith("2 call(s) checked on meta tensors (1 distinct)")


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("efficientnet_b0", 64), ("convnext_atto", 64),
                                        ("vit_tiny_patch16_224", 224), ("regnetz_b16_evos", 64)])
def test_passing_norms_through_records_the_shapes_of_running_them(name, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    watch = {n: s.module for s in find_sites(model) for n in s.names}
    example = torch.zeros(2, 3, size, size)
    run = meta_forward(model, example, watch, train=False)
    rules = _shape_rules(find_sites(model))
    passed = meta_forward(model, example, watch, train=False, pass_through=rules)
    assert run.error is None and passed.error is None  # (EvoNorm sites are unsupported: they run)
    assert len(run.shapes) == len(watch) and passed.shapes == run.shapes
    assert all("forward" not in m.__dict__ for m in watch.values())  # the wrapper is removed


def test_a_norm_that_does_not_fit_the_probe_input_still_fails_the_probe():
    """A model that starts with its norm has no conv to tell the input's channels: the probe's guess
    (3 channels) fails at the norm, so verification is skipped with a warning, not wrongly failed."""
    model = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU())
    with pytest.warns(UserWarning, match="could not be verified"):
        new = ns.convert(model, to="gn", num_groups=3)
    assert "the model does not run on meta tensors" in new.normsurgeon_report.verify


def test_the_probe_does_not_run_the_norms_it_passes_through(monkeypatch):
    model = timm.create_model("resnet18", pretrained=False)
    sites = find_sites(model)
    watch = {n: s.module for s in sites for n in s.names}
    calls = []
    original = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = meta_forward(model, torch.zeros(2, 3, 64, 64), watch, pass_through=_shape_rules(sites))
    assert len(watch) == 20 and len(result.shapes) == 20 and not calls
    assert meta_forward(model, torch.zeros(2, 3, 64, 64), watch).shapes == result.shapes and len(calls) == 20
