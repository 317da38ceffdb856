"""Shared test scaffolding: a trainer factory and a recorder of what a RepaCallback saw. The tiny
modules and data (`TinyFlow`, `loader`, ...) live in `lightning_repa.testing` and are re-exported."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import pytest
from lightning_repa.testing import (  # noqa: F401  (re-exported for the tests)
    LatentData, TinyFlow, TinyVideoFlow, VideoData, tiny_loader as loader, tiny_video_loader as video_loader,
)


def trainer(max_steps: int = 3, callbacks: Optional[list] = None, **kwargs: Any) -> L.Trainer:
    options = dict(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [], deterministic=True,
        log_every_n_steps=1,  # `repa/*` reach callback_metrics on the steps Lightning writes logs
    )
    options.update(kwargs)
    return L.Trainer(**options)


class Recorder(L.Callback):
    """Observes a RepaCallback through its public seams only (put it after the callback):

    - `results`: each micro-batch's `repa.last_result` (weight, loss, similarity, method terms);
    - `inputs`: what the objective was handed for each measured micro-batch (the step's listener), as
      a dict with the student tokens (graph included), their grid, the teacher tokens and their grid;
    - `steps`: once per optimizer step, the step, the similarity logged for it (None when no
      micro-batch measured), every logged `repa/*` value and the cutoff's EMA after it;
    - `initial`: the projector's weights at fit start.
    """

    def __init__(self, repa: Any) -> None:
        self.repa = repa
        self.results: list[Any] = []
        self.inputs: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        repa.step.listeners.append(lambda x: self.inputs.append(
            dict(student=x.student, grid_s=x.grid_s, teacher=x.teacher.tokens, grid_t=x.teacher.grid,
                 frames_per_latent=x.teacher.frames_per_latent)))

    def on_fit_start(self, trainer, pl_module):
        projector = getattr(pl_module, self.repa.projector_attr)
        self.initial = {k: v.detach().clone() for k, v in projector.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, *args):
        result = self.repa.last_result
        self.results.append(result)
        if trainer.global_step == result.step:
            return  # still accumulating
        mine = [r for r in self.results if r.step == result.step]
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("repa/")}
        self.steps.append(dict(step=result.step, logged=logged, ema=self.repa.cutoff.ema,
                               similarity=logged["repa/similarity"] if any(r.measured and not r.skipped for r in mine)
                               else None))

    def measured_steps(self) -> list[int]:
        return [s["step"] for s in self.steps if s["similarity"] is not None]


def labelled_grid(path, grid_wh: tuple[int, int], rows: int, title: bool = False):
    """Check a sample grid PNG of `grid_wh` pixels (the samples and their gaps) and return it as an
    array: it sits at the bottom right (a 4-pixel border), the gray gap (128) frames it, and each of
    the `rows` row bands has dark label pixels left of it (and the title band above, when asked)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        assert im.mode == "L"
        pixels = np.asarray(im)
    gw, gh = grid_wh
    height, width = pixels.shape
    top, left = height - 4 - gh, width - 4 - gw
    assert top > 0 and left > 0, "labels take room above and left of the grid"
    grid = pixels[top: top + gh, left: left + gw]
    assert (grid[0] == 128).all() and (grid[:, 0] == 128).all(), "the grid's gray frame is where expected"
    band = gh // rows
    for r in range(rows):
        assert (pixels[top + r * band: top + (r + 1) * band, :left] < 100).any(), f"row {r} has no label"
    if title:
        assert (pixels[:12, left:] < 100).any(), "no title"
    return grid


def quick(values: Any, keep: Any) -> list:
    """`parametrize` values of which only those in `keep` run in the quick set; the others, per-family
    repeats of a code path the quick set runs once, are marked `slow` (`-m slow`; CI runs both). A tuple
    value is matched on its first item (the family)."""
    def first(v: Any) -> Any:
        return v[0] if isinstance(v, tuple) else v

    unknown = set(keep) - {first(v) for v in values}
    if unknown:
        raise ValueError(f"quick(): {sorted(unknown)} are not among the values")
    return [v if first(v) in keep else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
            for v in values]
