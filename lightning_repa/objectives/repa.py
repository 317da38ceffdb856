"""REPA (SPEC 6.1): `loss = -mean_b token_cosine(p_b, f_b)` on one block's image tokens."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_repa.maths.align import Grid, TeacherTokens
from lightning_repa.maths.losses import token_cosine
from lightning_repa.objectives.base import AlignResult, Objective


class RepaObjective(Objective):
    """Negative mean cosine of matching projected student and teacher tokens (B, N, D)."""

    def __call__(self, student: Tensor, grid_s: Grid, teacher: TeacherTokens, projector: nn.Module) -> AlignResult:
        p, f = self.align(student, grid_s, teacher, projector)  # (B, M, D) each
        similarity = token_cosine(p, f).mean()  # ()
        return AlignResult(loss=-similarity, similarity=similarity.detach())
