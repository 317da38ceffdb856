"""What one optimizer step of a REPA callback reports (SPEC section 8). No Lightning import.

Means over the step's micro-batches and over all ranks (torchmetrics `MeanMetric`, whose
`compute()` syncs across processes), whether the step aligned at all, and the count of steps
whose alignment was skipped because something was not finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_repa.maths.align import Grid
from lightning_repa.maths.schedule import StepPlan


@dataclass
class StepRecord:
    """One micro-batch, computed once in `training_step` and handed on: the optimizer step's plan
    (weight, measure), the clean latents and the student's token grid."""

    plan: StepPlan
    latents: Tensor  # (B, C, h, w) clean training latents
    grid: Optional[Grid]  # student token grid; None when this step does not measure


class StepMetrics:
    """The account of one optimizer step, closed by :meth:`close` once the optimizer has stepped.

    Args:
        max_nonfinite_steps: after this many optimizer steps in a row whose alignment was
            skipped (non-finite tokens or loss), :meth:`close` raises.
    """

    def __init__(self, max_nonfinite_steps: int = 10) -> None:
        self.max_nonfinite_steps = max_nonfinite_steps
        self._means: dict[str, MeanMetric] = {"loss": _mean(), "similarity": _mean()}
        self._device = torch.device("cpu")
        self.skipped_total = 0  # optimizer steps with a skipped micro-batch, over the whole run
        self.skipped_in_a_row = 0
        self.aligned = False  # some micro-batch of this step added a (weighted, finite) loss
        self.skipped: Optional[str] = None  # what was not finite in this step

    def to(self, device: torch.device) -> "StepMetrics":
        self._device = torch.device(device)
        for metric in self._means.values():
            metric.to(self._device)
        return self

    def reset(self) -> None:
        """Start a new optimizer step."""
        for metric in self._means.values():
            metric.reset()
        self.aligned, self.skipped = False, None

    def update(self, loss: Tensor, similarity: Optional[Tensor], terms: dict[str, Tensor]) -> None:
        """One micro-batch: the weighted loss (0 when not aligned), the similarity and terms when measured."""
        self._means["loss"].update(loss.detach())
        if similarity is not None:
            self._means["similarity"].update(similarity)
        for name, value in terms.items():
            if name not in self._means:
                self._means[name] = _mean().to(self._device)
            self._means[name].update(value)

    def close(self, step: int) -> tuple[Optional[float], dict[str, float]]:
        """(the step's similarity, mean over micro-batches and ranks, or None if none was measured;
        the other means by name, with `skipped`). Raises after too many skipped steps in a row."""
        if self.skipped is not None:
            self.skipped_total += 1
            self.skipped_in_a_row += 1
        elif self._means["similarity"].update_count:
            self.skipped_in_a_row = 0
        if self.skipped_in_a_row >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"REPA skipped the alignment of {self.skipped_in_a_row} optimizer steps in a row (up to step {step}) "
                f"because {self.skipped} were not finite: check the batch's clean latents/pixels, the VAE/decoder "
                "and the denoiser's activations (precision); `max_nonfinite_steps` sets how many are tolerated"
            )
        similarity = None
        if self._means["similarity"].update_count:
            similarity = float(self._means["similarity"].compute())
        means = {name: float(m.compute()) for name, m in self._means.items() if name != "similarity" and m.update_count}
        means.setdefault("loss", 0.0)  # no micro-batch measured: nothing was added
        means["skipped"] = float(self.skipped_total)
        return similarity, means

    def reset_counts(self) -> None:
        """Forget the skipped steps of an earlier fit."""
        self.skipped_total = self.skipped_in_a_row = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))


def _mean() -> MeanMetric:
    """A mean synced across ranks; non-finite values never reach it (the callback skips them), so
    it does not look for NaN (a host sync per update) where torchmetrics allows that."""
    try:
        return MeanMetric(nan_strategy="disable")
    except ValueError:  # a torchmetrics without the "disable" strategy
        return MeanMetric()
