"""What every alignment objective shares (SPEC sections 5 and 6.4): pure tensor maths, no Lightning.

An objective turns the captured student tokens and their grid, the teacher's tokens
(:class:`~lightning_repa.maths.align.TeacherTokens`) and the projector into an :class:`AlignResult`. The shared part is :meth:`Objective.align`: the iREPA
teacher normalisation, the projection, and the spatial choice (resample the projected tokens
to the teacher grid, or mean-pool both sides to one token per frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from torch import Tensor, nn

from lightning_repa.maths.align import Grid, TeacherTokens, pool_tokens, resample_tokens


@dataclass
class AlignResult:
    """One micro-batch of alignment, before the scheduled weight.

    `loss` is what the weight multiplies (the aux loss is `weight * loss`); `similarity` is the
    mean cosine of matching tokens, in [-1, 1], fed to the similarity EMA and the cutoff;
    `terms` are further scalars the method logs as `repa/<name>` (e.g. `manifold`, `score`).
    """

    loss: Tensor  # () with a graph when the projector trains
    similarity: Tensor  # (), detached
    terms: dict[str, Tensor] = field(default_factory=dict)  # name -> (), detached


def spatial_zscore(f: Tensor, alpha: float = 0.6) -> Tensor:
    """iREPA teacher normalisation over the tokens of (..., N, D), per channel.

    `(f - alpha * mean_N f) / (std_N f + 1e-6)`, with the unbiased std over N (torch's default,
    as in the iREPA code). alpha=1 is a plain z-score, alpha=0 only rescales.
    """
    if f.ndim < 2:
        raise ValueError(f"spatial_zscore expects (..., N, D) tokens, got shape {tuple(f.shape)}.")
    if f.shape[-2] < 2:
        raise ValueError(
            f"spatial_zscore needs at least 2 tokens per frame to take a std over them, got N={f.shape[-2]}; "
            "iREPA (`irepa`) needs spatial tokens, so do not combine it with spatial_align=False."
        )
    mean = f.mean(dim=-2, keepdim=True)  # (..., 1, D)
    std = f.std(dim=-2, keepdim=True)  # (..., 1, D)
    return (f - alpha * mean) / (std + 1e-6)  # (..., N, D)


class Objective:
    """Base of the per-method objectives: `objective(student, grid_s, teacher, projector)`.

    Args:
        spatial_align: True resamples the projected tokens to the teacher grid; False mean-pools
            both sides to one token per frame.
        irepa_alpha: None, or iREPA's alpha: the teacher tokens are spatially z-scored per frame.

    Subclasses implement `__call__` and list in `options` the `RepaConfig` options that only
    their method reads (`RepaConfig.validate` refuses them with any other method).
    """

    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spatial_align: bool = True, irepa_alpha: Optional[float] = None) -> None:
        self.spatial_align, self.irepa_alpha = spatial_align, irepa_alpha

    @classmethod
    def from_config(cls, cfg: Any) -> "Objective":
        """Built from a `RepaConfig` (the options of `options` are read by the subclass)."""
        return cls(**cls.common(cfg))

    @staticmethod
    def common(cfg: Any) -> dict[str, Any]:
        return {"spatial_align": cfg.spatial_align, "irepa_alpha": cfg.irepa_alpha if cfg.irepa else None}

    def align(self, student: Tensor, grid_s: Grid, teacher: TeacherTokens, projector: nn.Module) -> tuple[Tensor, Tensor]:
        """Project the student and put both sides on one grid.

        student (..., N, hidden) row-major on `grid_s`, the teacher's tokens (..., M, D) on its
        grid, the same leading dims (B, or B and T for video). Returns (p, f), both (..., M, D), or
        (..., 1, D) pooled, in at least float32.
        """
        grid_t, teacher = teacher.grid, teacher.tokens.float()
        if self.irepa_alpha is not None:
            teacher = spatial_zscore(teacher, self.irepa_alpha)  # (..., M, D)
        projected = projector(student, grid_s)  # (..., N, D)
        if projected.shape[-1] != teacher.shape[-1]:
            raise ValueError(
                f"projector output dim {projected.shape[-1]} != teacher dim {teacher.shape[-1]} (`encoder`)"
            )
        if self.spatial_align:
            projected = resample_tokens(projected, grid_s, grid_t)  # (..., M, D)
        else:
            projected, teacher = pool_tokens(projected), pool_tokens(teacher)  # (..., 1, D)
        return projected, teacher.to(projected.device)

    def check_batch(self, batch_size: int) -> None:
        """Refuse a micro-batch this objective cannot score (checked on every micro-batch, before training)."""

    def __call__(self, student: Tensor, grid_s: Grid, teacher: TeacherTokens, projector: nn.Module) -> AlignResult:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")
