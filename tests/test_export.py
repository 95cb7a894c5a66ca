"""Export of every target in eval mode with a dynamic batch dimension: torch.export, ONNX (dynamo and
legacy exporters), checked with onnxruntime against eager at batch 1 and 3 from one file; which ONNX
ops each target becomes; bad input.

The default run covers a small conv net (every target, torch.export and the legacy exporter; the
dynamo exporter for a few targets, since each of its exports takes seconds); ``-m slow`` runs
ResNet-18 and EfficientNet-B0 with every target and exporter, and the dynamo op table.
"""
from __future__ import annotations

import os
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import normsurgeon as ns
from normsurgeon.deploy import ExportError, export_program

from conftest import randomize_norms, small_convnet

onnx = pytest.importorskip("onnx", reason="the [export] extra is not installed (pip install 'normsurgeon[export]')")
ort = pytest.importorskip("onnxruntime", reason="the [export] extra is not installed (pip install 'normsurgeon[export]')")
pytest.importorskip("onnxscript", reason="the [export] extra is not installed (pip install 'normsurgeon[export]')")

TARGETS = list(ns.available_targets())
OPTIONS = {"bgn": {"num_groups": 4}, "dsbn": {"domains": ["photo", "art"]}}

# The ops that carry each target in the exported graph (opset 18). Batch-statistics targets in eval
# are an affine map: the dynamo exporter's optimizer folds it into the conv (no node left); the
# legacy exporter folds BatchNorm-type modules into the conv too, except bgn and dsbn (indexed or
# repeated statistics), which stay a BatchNormalization node.
NORM_OPS = {"BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization"}
OPS_DYNAMO = {  # opset 18 (opset 21: "InstanceNormalization" becomes "GroupNormalization")
    "bn": set(), "cbn": set(), "mbn": set(), "dsbn": set(), "bgn": set(),
    "frozen_bn": {"Mul", "Add"},
    "gn": {"InstanceNormalization", "Mul", "Add"}, "ln": {"InstanceNormalization", "Mul", "Add"},
    "in": {"InstanceNormalization", "Mul", "Add"},
    "pn": {"LayerNormalization", "Transpose"},
    "iebn": {"ReduceMean", "Sigmoid", "Mul", "Sub", "Add"},
    "proxy_gn": {"InstanceNormalization", "Mul", "Add", "Sub"},
    "proxy_ln": {"InstanceNormalization", "Mul", "Add", "Sub"},
}
OPS_LEGACY = dict(OPS_DYNAMO, bgn={"BatchNormalization", "Tile"}, dsbn={"BatchNormalization"})


def converted(base: nn.Module, to: str) -> nn.Module:
    model = ns.convert(base, to=to, **OPTIONS.get(to, {})).eval()
    if to == "dsbn":
        ns.set_domain(model, "art")
    return model


def relative_error(got, want: torch.Tensor) -> float:
    got = torch.as_tensor(got)
    return ((got - want).abs().max() / want.abs().max()).item()


def check_onnx(path: str, model: nn.Module, size: int) -> set[str]:
    """One session from one file, batch 1 and 3 against eager (≤ 1e-4 relative); the file's op types."""
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".data")], "weights must be inside the file"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
        assert relative_error(session.run(None, {"input": x.numpy()})[0], want) <= 1e-4
    return {node.op_type for node in onnx.load(path).graph.node}


def check_program(model: nn.Module, size: int) -> None:
    program = export_program(model, torch.randn(2, 3, size, size))
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert relative_error(program.module()(x), model(x)) <= 1e-5


def export(model, path, dynamo, opset=18, size=16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return ns.export_onnx(model, torch.randn(2, 3, size, size), path, dynamo=dynamo, opset=opset)


@pytest.mark.parametrize("to", TARGETS)
def test_every_target_exports_with_torch_export_and_the_legacy_exporter(to, tmp_path):
    model = converted(small_convnet(), to)
    check_program(model, 16)
    ops = check_onnx(export(model, str(tmp_path / "m.onnx"), dynamo=False), model, 16)
    assert OPS_LEGACY[to] <= ops and ops & NORM_OPS == OPS_LEGACY[to] & NORM_OPS, (to, sorted(ops))


@pytest.mark.parametrize("to", ["bn", "gn", "proxy_gn"])
def test_dynamo_exporter_representatives(to, tmp_path):
    model = converted(small_convnet(), to)
    ops = check_onnx(export(model, str(tmp_path / "m.onnx"), dynamo=True), model, 16)
    assert OPS_DYNAMO[to] <= ops and ops & NORM_OPS == OPS_DYNAMO[to] & NORM_OPS, (to, sorted(ops))


@pytest.mark.slow
@pytest.mark.parametrize("to", TARGETS)
def test_dynamo_op_table_at_opsets_18_and_21(to, tmp_path):
    model = converted(small_convnet(), to)
    for opset in (18, 21):
        ops = check_onnx(export(model, str(tmp_path / f"m{opset}.onnx"), dynamo=True, opset=opset), model, 16)
        want = OPS_DYNAMO[to]
        if opset >= 21 and "InstanceNormalization" in want:
            want = (want - {"InstanceNormalization", "Mul", "Add"}) | {"GroupNormalization"}
        assert want <= ops and ops & NORM_OPS == want & NORM_OPS, (to, opset, sorted(ops))
        os.remove(tmp_path / f"m{opset}.onnx")


@pytest.fixture(scope="module", params=["resnet18", "efficientnet_b0"])
def network(request):
    torch.manual_seed(0)
    if request.param == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
    else:
        model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    return randomize_norms(model).eval()


@pytest.mark.slow
@pytest.mark.parametrize("to", TARGETS)
def test_networks_export_every_target(network, to, tmp_path):
    model = converted(network, to)
    check_program(model, 64)
    for dynamo in (True, False):
        (tmp_path / "legacy").mkdir(exist_ok=True)
        path = str(tmp_path / ("m.onnx" if dynamo else "legacy/m.onnx"))
        check_onnx(export(model, path, dynamo=dynamo, size=64), model, 64)


def test_folded_models_export(tmp_path):
    model = converted(small_convnet(), "iebn")
    folded = ns.fold(model)
    ops = check_onnx(export(folded, str(tmp_path / "m.onnx"), dynamo=False), model, 16)
    assert "Sigmoid" in ops and not ops & NORM_OPS


@pytest.mark.parametrize("dynamo", [False, True])
def test_an_example_of_batch_one_still_exports_a_dynamic_batch(dynamo, tmp_path):
    """Users pass one image (batch 1); torch.export alone would fix the batch at 1 or refuse."""
    model = converted(small_convnet(), "gn")
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ns.export_onnx(model, torch.randn(1, 3, 16, 16), path, dynamo=dynamo)
    check_onnx(path, model, 16)
    program = export_program(model, torch.randn(1, 3, 16, 16))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert relative_error(program.module()(x), model(x)) <= 1e-5


def test_train_mode_and_unrouted_dsbn_are_refused_with_the_fix(tmp_path):
    model = converted(small_convnet(), "cbn").train()
    for call in (lambda: ns.export_onnx(model, torch.randn(2, 3, 16, 16), str(tmp_path / "m.onnx")),
                 lambda: export_program(model, torch.randn(2, 3, 16, 16))):
        with pytest.raises(ExportError, match=r"2 batch-dependent normalization layers are in training mode "
                                              r"\('1', '4'\).*Call model\.eval\(\)"):
            call()
    assert not os.listdir(tmp_path)
    gn = converted(small_convnet(), "gn").train()  # batch-independent: train mode is fine
    check_onnx(export(gn, str(tmp_path / "m.onnx"), dynamo=False), gn.eval(), 16)
    dsbn = converted(small_convnet(), "dsbn")
    ns.set_domain(dsbn, None)
    with pytest.raises(ExportError, match=r"no single domain chosen.*set_domain\(model, d\).*'photo', 'art'"):
        export_program(dsbn, torch.randn(2, 3, 16, 16))


def test_legacy_export_restores_every_module_flag(tmp_path):
    model = converted(small_convnet(), "gn")
    model[0].train()  # the user's own choice for one module
    export(model, str(tmp_path / "m.onnx"), dynamo=False)
    assert model[0].training and not model.training and not model[1].training
