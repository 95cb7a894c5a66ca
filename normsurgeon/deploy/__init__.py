"""Deployment: fold eval-time norms into convolutions, export (torch.export, ONNX), compile.

    folded = normsurgeon.fold(model.eval())              # BN-type norms folded into their convs
    print(folded.normsurgeon_fold_report)
"""
from .affine import EvalAffine, eval_affine
from .fold import FoldReport, FoldRow, fold
from .remnants import FoldedAct, InstanceGate

__all__ = ["fold", "FoldReport", "FoldRow", "eval_affine", "EvalAffine", "FoldedAct", "InstanceGate"]
