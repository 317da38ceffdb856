"""`repa/cknna` during training: CKNNA of the projected student tokens and the teacher's tokens on
the first validation batch, every `cknna_every_n_steps` optimizer steps, without gradients. The
measure (`maths.kernel_alignment.KernelAlignment`) is the one the probe uses. No Lightning import."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_repa.alignment import AlignmentStep
from lightning_repa.maths.kernel_alignment import KernelAlignment
from lightning_repa.models.capture import BlockCapture
from lightning_repa.models.families import Family

MIN_SAMPLES = 4  # CKNNA needs N >= 4 samples (k = min(10, N - 1) neighbours)


class HeldOutCknna:
    """Arms the capture on a due validation batch and measures it once the batch has run."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.measure = KernelAlignment(k=10)
        self.last_step: Optional[int] = None  # optimizer step of the last measurement
        self.grid: Optional[tuple[int, ...]] = None  # the armed batch's student grid

    def reset(self) -> None:
        self.last_step = self.grid = None

    def arm(self, step: int, batch_idx: int, dataloader_idx: int, capture: BlockCapture, family: Family,
            latents: Tensor) -> None:
        """On the first batch of the first validation loader, when a measurement is due."""
        if not self.every or batch_idx or dataloader_idx:
            return
        if self.last_step is not None and step - self.last_step < self.every:
            return
        self.grid = family.grid(latents.shape, capture.denoiser)
        capture.arm(math.prod(self.grid), with_grad=False)

    def measure_batch(self, step: int, capture: BlockCapture, align: AlignmentStep, batch: Mapping[str, Any],
                      latents: Tensor, projector: nn.Module) -> Optional[float]:
        """CKNNA of the armed batch; None (and nothing armed) when the denoiser did not run on enough samples."""
        grid, self.grid = self.grid, None
        if capture.grad_calls == 0 or latents.shape[0] < MIN_SAMPLES:
            capture.clear()
            return None
        with torch.no_grad():
            self.measure.update(*align.pair(capture.take_all(grid), batch, latents, projector))
        value = float(self.measure.compute()["cknna"])
        self.measure.reset()
        self.last_step = step
        return value
