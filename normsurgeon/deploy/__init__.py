"""Deployment: fold eval-time norms into convolutions, export (torch.export, ONNX), compile.

    folded = normsurgeon.fold(model.eval())              # BN-type norms folded into their convs
    print(folded.normsurgeon_fold_report)
    normsurgeon.export_onnx(folded, example, "model.onnx")   # dynamic batch; dynamo=False: legacy exporter
    program = normsurgeon.deploy.export_program(folded, example)   # torch.export
"""
from .affine import EvalAffine, eval_affine
from .export import ExportError, check_exportable, export_onnx, export_program
from .fold import FoldReport, FoldRow, fold
from .remnants import FoldedAct, InstanceGate

__all__ = ["fold", "FoldReport", "FoldRow", "eval_affine", "EvalAffine", "FoldedAct", "InstanceGate",
           "export_onnx", "export_program", "check_exportable", "ExportError"]
