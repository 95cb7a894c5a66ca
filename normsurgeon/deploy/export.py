"""Export an eval-mode model with a dynamic batch dimension: ``torch.export`` and ONNX.

    program = ns.deploy.export_program(model.eval(), example)               # torch.export.ExportedProgram
    ns.export_onnx(model.eval(), example, "model.onnx")                      # dynamo exporter, opset 18
    ns.export_onnx(model.eval(), example, "model.onnx", dynamo=False)        # legacy (TorchScript) exporter

Both check the model first (``check_exportable``): a batch-dependent norm (the BatchNorm family,
bgn, iebn, cbn, mbn, dsbn) in training mode would export a graph that normalizes every inference
batch with its own statistics, and a dsbn model needs a domain to export for. Dimension 0 of the
example (and of the output) is dynamic: one exported file serves every batch size. The ONNX file is
self-contained (weights inside, not in a separate ``.data`` file). What each target becomes in
ONNX is listed in the README ("Deploy"); with the dynamo exporter, opset 21 or later writes
GroupNorm/LayerNorm-type targets as one ``GroupNormalization`` node, opsets 18–20 as
``InstanceNormalization`` plus a per-channel ``Mul``/``Add``.

The legacy exporter switches the whole model to eval mode while it traces; every module's own
flag is restored afterwards.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..domains.routing import domain_layers
from ..model_state import preserved
from .affine import require_eval_norms

DEFAULT_OPSET = 18
MAX_BATCH = 4096  # upper bound of the exported batch dimension


class ExportError(RuntimeError):
    """The model cannot be exported as it is (the message says what to do)."""


def check_exportable(model: nn.Module) -> None:
    """Raise ``ExportError`` when a batch-dependent norm is in training mode or a dsbn layer has
    no domain chosen; otherwise return None."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a model (nn.Module), got {type(model).__name__}")
    require_eval_norms(model, ExportError, "an exported graph would normalize each inference batch with its own "
                       "statistics and never update the running ones", "Call model.eval() before exporting.")
    unrouted = [name for name, layer in domain_layers(model) if not isinstance(layer.route, int)]
    if unrouted:
        domains = ", ".join(repr(d) for d in domain_layers(model)[0][1].domains)
        raise ExportError(
            f"the model's domain-specific BatchNorm layers ({unrouted[0]!r}, ...) have no single domain chosen: "
            f"export for one domain with normsurgeon.set_domain(model, d) or normsurgeon.fold(model, domain=d) "
            f"(domains: {domains}).")


def _batch_dim():
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def _example_for_tracing(example: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """The example with a batch of 2 when it has 1 and the batch is to stay dynamic: torch.export
    treats a size-1 dimension as the constant 1 and would refuse to make it dynamic."""
    if dynamic_batch and isinstance(example, torch.Tensor) and example.ndim > 0 and example.shape[0] == 1:
        return example.repeat(2, *[1] * (example.ndim - 1))
    return example


def export_program(model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True):
    """``torch.export.export(model, (example,))`` with dimension 0 dynamic; after ``check_exportable``.
    An example with batch 1 is traced as two copies of itself (torch.export specializes size 1)."""
    check_exportable(model)
    example = _example_for_tracing(example, dynamic_batch)
    return torch.export.export(model, (example,), dynamic_shapes=_batch_dim() if dynamic_batch else None)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, dynamo: bool = True,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> str:
    """Write ``model`` (eval mode) to the ONNX file ``path``, input "input" and output "output" with a
    dynamic batch dimension; returns the path. ``dynamo=False`` uses torch's legacy TorchScript-based
    exporter. Needs the ``onnx``/``onnxscript`` packages for the dynamo exporter
    (``pip install "normsurgeon[export]"``)."""
    check_exportable(model)
    example = _example_for_tracing(example, dynamic_batch)
    path = os.fspath(path)
    names = {"input_names": ["input"], "output_names": ["output"]}
    if dynamo:
        try:
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise ImportError("the dynamo ONNX exporter needs onnx and onnxscript: pip install 'normsurgeon[export]' "
                              "(or export with dynamo=False)") from exc
        torch.onnx.export(model, (example,), path, dynamo=True, opset_version=opset, external_data=False,
                          dynamic_shapes=_batch_dim() if dynamic_batch else None, verbose=False, **names)
        return path
    with preserved(model):
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset, dynamic_axes=axes, **names)
    return path
