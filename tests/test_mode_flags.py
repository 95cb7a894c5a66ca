"""Every module's own train/eval flag survives convert, plan, diagnose, calibrate and finetune.

Detection and segmentation code freezes parts of a backbone (``model.layer1.eval()``, a frozen
stem) while the rest trains. Anything that runs the model and restores its mode with
``model.train(flag)`` silently unfreezes them; for ``bn`` a train-mode forward then updates the
frozen stage's running statistics. ``model_state.preserved`` is the one helper that saves and
restores state; these tests hold every entry point to it.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

import normsurgeon as ns
from normsurgeon.model_state import preserved
from normsurgeon.training.finetune import evaluate

from conftest import randomize_norms

TARGETS = ["bn", "frozen_bn", "gn", "ln", "in", "pn", "proxy_gn", "proxy_ln", "bgn", "iebn", "cbn", "mbn", "dsbn"]
OPTIONS = {"dsbn": {"domains": 2}, "bgn": {"num_groups": 8}}


def frozen_resnet() -> torch.nn.Module:
    """A ResNet-18 training, with its stem (conv1, bn1) and layer1 frozen in eval mode."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet18", num_classes=10)).train()
    for part in (model.conv1, model.bn1, model.layer1):
        part.eval()
    return model


def flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def assert_flags_kept(before: dict[str, bool], model: torch.nn.Module) -> None:
    after = flags(model)
    changed = {n: (before[n], after[n]) for n in before if n in after and before[n] != after[n]}
    assert not changed, f"train/eval flags changed (before, after): {changed}"
    frozen = [n for n in after if n.split(".")[0] in ("conv1", "bn1", "layer1") and after[n]]
    assert not frozen, f"modules of the frozen stem/layer1 in train mode: {frozen}"


@pytest.mark.parametrize("to", TARGETS)
def test_flags_survive_convert_copy_and_inplace(to):
    for inplace in (False, True):
        model = frozen_resnet()
        before = flags(model)
        assert sum(not f for f in before.values()) == 21  # conv1, bn1 and layer1 with its 18 submodules
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = ns.convert(model, to=to, inplace=inplace, input_size=(3, 32, 32), **OPTIONS.get(to, {}))
        assert_flags_kept(before, new)
        assert_flags_kept(before, model)  # the original too (a copy: untouched; inplace: the same model)


def test_bn_keeps_a_frozen_stage_exact_in_a_train_mode_forward():
    """With layer1 frozen, a train-mode forward of the converted model equals the original's: layer1
    normalizes with (and keeps) its running statistics."""
    model = frozen_resnet()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    new = ns.convert(model, to="bn", input_size=(3, 32, 32))
    with preserved(model, buffers=True):
        expected = model(x)
    torch.testing.assert_close(new(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean)


def test_flags_survive_plan_diagnose_calibrate_and_evaluation():
    model = frozen_resnet()
    before = flags(model)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ns.plan(model, to="proxy_gn", input_size=(3, 32, 32))
    assert_flags_kept(before, model)

    new = ns.convert(model, to="gn", input_size=(3, 32, 32))
    new_before = flags(new)
    ns.diagnose(new, x, reference=model, batch_size=8)
    assert_flags_kept(before, model)
    assert_flags_kept(new_before, new)
    bn_model = frozen_resnet()
    ns.diagnose(bn_model, x, batch_sizes=[2, 4], batch_size=8, max_batches=2)  # the batch-statistics sweep
    assert_flags_kept(before, bn_model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for inplace in (False, True):
            calibrated = ns.calibrate(new, model, x, inplace=inplace, augment=False)
            assert_flags_kept(new_before, calibrated)
            assert_flags_kept(new_before, new)
            assert_flags_kept(before, model)

    evaluate(new, x, teacher=model, batch_size=8)
    assert_flags_kept(new_before, new)
    assert_flags_kept(before, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns.finetune(new, x, teacher=model, steps=1, batch_size=8, eval_data=x, progress=False)
    assert_flags_kept(new_before, new)
    assert_flags_kept(before, model)


def test_preserved_gives_back_flags_buffers_and_parameters():
    model = frozen_resnet()
    bn = model.layer2[0].bn1
    mean, weight = bn.running_mean, bn.weight
    expected_mean, expected_weight = mean.clone(), weight.detach().clone()
    seen = []
    with preserved(model, buffers=True, parameters=True, on_restore=seen.extend):
        model.train()
        model(torch.randn(2, 3, 32, 32))
        with torch.no_grad():
            weight.mul_(2)
        bn.running_var = torch.zeros(3)  # replaced by another tensor, of another shape
        bn.register_buffer("extra", torch.ones(1))
    assert_flags_kept(flags(frozen_resnet()), model)
    assert bn.running_mean is mean and bn.weight is weight and "extra" not in bn._buffers
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(weight.detach(), expected_weight)
    assert bn.running_var.shape == mean.shape
    assert "layer2.0.bn1.weight" in seen and "layer2.0.bn1.extra" in seen and "layer2.0.bn1.running_var" in seen


def test_preserved_keeps_what_it_is_told_to_keep():
    model = frozen_resnet()
    bn = model.layer2[0].bn1
    with preserved(model, modes=False, buffers=True, keep={id(bn.running_mean)}):
        model.train()
        model(torch.randn(2, 3, 32, 32))
        kept = bn.running_mean.clone()
    torch.testing.assert_close(bn.running_mean, kept)
    assert model.training  # modes=False: flags are left as they are
