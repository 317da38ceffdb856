"""Sample grids of the demo modules (those with `save_sample_grid`): one at each validation (small,
logged to W&B as an image) and one at the end of training (written into the run directory and
logged too). Each is titled with the step and the alignment method."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, WandbLogger
from typing_extensions import override


def grid_title(step: int, callbacks: Sequence[Any]) -> str:
    """E.g. `step 400, REPA (block 2, vit_tiny_digits_patch2)`; `step 400, no alignment`."""
    methods = [f"{cb.method.value.upper()} (block {cb.block_index}, {cb.teacher_name})" for cb in callbacks]
    return f"step {step}, {' + '.join(methods) or 'no alignment'}"


def save_grid(module: pl.LightningModule, path: Path, sample: Any, loggers: Sequence[Logger], step: int, title: str,
              per_class: Optional[int] = None, steps: Optional[int] = None) -> Path:
    """Write `module`'s sample grid to `path` and log it to every W&B logger under `samples`."""
    path = Path(module.save_sample_grid(path, steps=steps or sample.steps, per_class=per_class or sample.per_class,
                                        guidance=sample.guidance, scale=sample.scale, seed=sample.seed, title=title))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="samples", images=[str(path)], step=step, caption=[title])
    return path


class ValidationGrids(pl.Callback):
    """After each validation (not the sanity check), a small grid (2 samples per class, half the
    Euler steps) into `<run>/samples/` and to W&B, when a W&B logger is on."""

    def __init__(self, directory: Path, sample: Any, callbacks: Sequence[Any]) -> None:
        self.directory, self.sample, self.callbacks = Path(directory), sample, list(callbacks)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not hasattr(pl_module, "save_sample_grid"):
            return
        wandb = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb:
            return
        step = trainer.global_step
        save_grid(pl_module, self.directory / f"step{step:06d}.png", self.sample, wandb, step,
                  grid_title(step, self.callbacks), per_class=2, steps=max(1, self.sample.steps // 2))
