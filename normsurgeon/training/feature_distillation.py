"""Feature distillation: match the teacher's pre-activation at every norm site, not only the logits.

A converted model has the original's layout, so each norm site has a counterpart in the
teacher. The loss at one step is the mean over matched sites of

    mean((z_s − z_t)²) / (var(z_t) + 1e-6)

with z the pre-activation (N, C, S) seen by the diagnostics hooks (after the norm's affine,
before its activation): a scale-free per-layer MSE, so wide and narrow layers weigh the same.
It gives every layer a direct target (as calibration does, but trained), which makes the
student follow the teacher in far fewer steps than the logits alone.
"""
from __future__ import annotations

import torch
from torch import nn

from ..diagnostics.hooks import attach_preactivation_hooks
from ..surgery.graph.sites import find_sites


class FeatureMatcher:
    """Records both models' pre-activations during their forwards; ``loss()`` compares them."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        common = sorted({s.name for s in find_sites(student) if s.match.reader is not None}
                        & {s.name for s in find_sites(teacher) if s.match.reader is not None})
        if not common:
            raise ValueError("feature distillation needs norm sites with the same names in the student and "
                             "the teacher (a model converted from the teacher has them)")
        self.student_z: dict[str, torch.Tensor] = {}
        self.teacher_z: dict[str, torch.Tensor] = {}
        self.handles = (attach_preactivation_hooks(student, self._keep_student, include=common)
                        + attach_preactivation_hooks(teacher, self._keep_teacher, include=common))

    def _keep_student(self, name: str, z: torch.Tensor) -> None:
        self.student_z[name] = z.clone()  # differentiable; an in-place activation cannot change it

    def _keep_teacher(self, name: str, z: torch.Tensor) -> None:
        self.teacher_z[name] = z.detach().clone()  # the teacher's activation may run in place

    def loss(self) -> torch.Tensor:
        names = [n for n in self.student_z if n in self.teacher_z]
        if not names:
            raise RuntimeError("feature distillation: no site ran in both models during this step")
        terms = []
        for n in names:
            z_s, z_t = self.student_z[n], self.teacher_z[n].to(self.student_z[n].dtype)
            if z_s.shape != z_t.shape:
                raise ValueError(f"feature distillation: site {n!r} has shape {tuple(z_s.shape)} in the student "
                                 f"but {tuple(z_t.shape)} in the teacher")
            terms.append((z_s - z_t).square().mean() / (z_t.var() + 1e-6))
        self.student_z.clear()
        self.teacher_z.clear()
        return torch.stack(terms).mean()

    def clear(self) -> None:
        self.student_z.clear()
        self.teacher_z.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.clear()
