"""One micro-batch of alignment, without Lightning (SPEC sections 5 and 6).

:class:`AlignmentStep` takes what the capture hooks caught, asks the teacher for its tokens, lays
video tokens out per frame, checks that both sides describe the same samples and frames, runs the
method's objective under the scheduled weight, and decides whether the result is finite (with the
other ranks, through the `agree` it is given). The callback calls it once per aligned micro-batch;
the CKNNA diagnostics reuse its first half (:meth:`AlignmentStep.pair`). Listeners see exactly what
the objective is handed::

    step = AlignmentStep(block_index=8, objective=build_objective(Method.repa, cfg), teacher=teacher)
    step.listeners.append(lambda inputs: print(inputs.student.shape, inputs.teacher.grid))  # each aligned batch
    aux, result = step(captured, batch, latents, projector, plan)   # aux: weight * loss, with its graph
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_repa.maths.align import Grid, TeacherTokens, per_frame
from lightning_repa.maths.schedule import StepPlan
from lightning_repa.models.capture import Captured
from lightning_repa.objectives import AlignResult, Objective
from lightning_repa.teachers.protocol import TeacherProtocol


@dataclass
class StepInputs:
    """What the objective is handed for one micro-batch."""

    student: Tensor  # (B, N, hidden), or per frame (B, T', N, hidden); with its graph
    grid_s: Grid  # the student's token grid (of one frame)
    teacher: TeacherTokens  # (B, M, D) or (B, T', M, D) on its grid, without gradients


@dataclass
class StepResult:
    """The public outcome of one micro-batch (`RepaCallback.last_result`): detached scalars."""

    step: int  # optimizer step (trainer.global_step)
    weight: float  # scheduled weight x cutoff
    measured: bool  # whether student and teacher tokens were computed
    loss: Tensor  # (), the weighted aux loss added to the step's loss (0 when not aligned)
    similarity: Optional[Tensor] = None  # (), mean cosine of matching tokens, when measured
    terms: dict[str, Tensor] = field(default_factory=dict)  # method terms, e.g. "manifold", "score"
    skipped: bool = False  # measured, but something was not finite: no alignment loss was added
    nonfinite: Optional[str] = None  # what was not finite, when skipped


Listener = Callable[[StepInputs], None]
Agree = Callable[[bool], bool]  # a local "skip" -> whether any rank skips


def nonfinite(*named: tuple[str, Tensor]) -> Optional[str]:
    """The name of the first tensor with a NaN or an infinity, or None."""
    for name, x in named:
        if not bool(torch.isfinite(x).all()):
            return name
    return None


class AlignmentStep:
    """Captured tokens of `block_index` + the teacher's tokens -> the objective -> (aux, StepResult).

    Args:
        block_index: the student block (0-based over all blocks in forward order).
        objective: the method's objective (`lightning_repa.objectives`).
        teacher: anything with the teacher protocol; may be set later (`step.teacher = ...`).

    `listeners` are called with the :class:`StepInputs` of every micro-batch the step aligns or
    measures, before the objective runs (not for :meth:`pair`, a diagnostic).
    """

    def __init__(self, block_index: int, objective: Objective, teacher: Optional[TeacherProtocol] = None) -> None:
        self.block_index, self.objective, self.teacher = block_index, objective, teacher
        self.listeners: list[Listener] = []

    def inputs(self, captured: Captured, batch: Mapping[str, Any], latents: Tensor) -> StepInputs:
        """The student's tokens per frame and the teacher's, checked to describe the same samples and frames."""
        student, grid_s = per_frame(captured[self.block_index], captured.grid)  # (B, N, h) or (B, T', N, h)
        teacher = self.teacher(batch, latents, captured)  # (B, M, D) or (B, T', M, D)
        if student.shape[0] != teacher.tokens.shape[0]:
            raise ValueError(
                f"the captured block holds {student.shape[0]} samples but the teacher gave {teacher.tokens.shape[0]}: "
                "the denoiser must be called on the batch whose clean latents the batch carries (one sample each)"
            )
        if student.shape[1:-2] != teacher.tokens.shape[1:-2]:
            raise ValueError(
                f"the student has {tuple(student.shape[1:-2])} frames and the teacher {tuple(teacher.tokens.shape[1:-2])}:"
                " a video family whose temporal patch size is > 1 is not supported"
            )
        return StepInputs(student, grid_s, teacher)

    def pair(self, captured: Captured, batch: Mapping[str, Any], latents: Tensor,
             projector: nn.Module) -> tuple[Tensor, Tensor]:
        """Projected student and teacher tokens on one grid, (..., M, D) each (e.g. for CKNNA)."""
        x = self.inputs(captured, batch, latents)
        return self.objective.align(x.student, x.grid_s, x.teacher, projector)

    def __call__(self, captured: Captured, batch: Mapping[str, Any], latents: Tensor, projector: nn.Module,
                 plan: StepPlan, agree: Agree = bool) -> tuple[Optional[Tensor], StepResult]:
        """Align one measured micro-batch: `(weight * loss with its graph, or None; StepResult)`.

        The loss is None when the weight is 0 (a recoverable cutoff still measuring) or when the
        step is skipped: a non-finite loss here, or on any rank (`agree(skip)` is True when some rank
        skips; by default only this process decides). Non-finite tokens make the loss non-finite:
        one check (one host sync) per step, the tokens are only inspected to name the culprit.
        """
        x = self.inputs(captured, batch, latents)
        for listener in self.listeners:
            listener(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and plan.weight > 0):
            result: AlignResult = self.objective(x.student, x.grid_s, x.teacher, projector)
        bad = None
        if nonfinite(("the alignment loss", result.loss)) is not None:
            bad = nonfinite(("the teacher tokens", x.teacher.tokens), ("the student tokens", x.student))
            bad = bad or "the alignment loss"
        if agree(bad is not None) and bad is None:
            bad = "another rank's tokens or alignment loss"
        zero = torch.zeros((), device=result.loss.device)
        if bad is not None:
            return None, StepResult(plan.step, plan.weight, True, zero, skipped=True, nonfinite=bad)
        aux = plan.weight * result.loss if plan.weight > 0 else None
        loss = zero if aux is None else aux.detach()
        return aux, StepResult(plan.step, plan.weight, True, loss, result.similarity, result.terms)
