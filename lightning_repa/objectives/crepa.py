"""CREPA (SPEC 6.3): per-frame alignment of a video DiT with its own and its neighbours' frames."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from lightning_repa.align import Grid
from lightning_repa.config import DistanceUnit
from lightning_repa.losses import crepa_scores
from lightning_repa.objectives.base import AlignResult, Objective


class CRepaObjective(Objective):
    """`loss = -mean_b per_video[b]`, `per_video[b]` the frames' neighbour-augmented scores
    (`losses.crepa_scores`) averaged over frames (summed with `normalize_by_frames=False`).

    Tokens are per frame: student (B, T, N, hidden), teacher (B, T, M, D). The similarity fed
    to the cutoff is the mean self-similarity; `terms["score"]` the mean per-video score.

    Args (besides the common ones): `distance`, `tau`, `cumulative`, `normalize_neighbours`,
    `normalize_by_frames`, `distance_unit`: see `RepaConfig`. A distance in pixel frames is
    converted with `temporal_ratio`, which the caller sets from the teacher's frames.
    """

    options = ("distance", "tau", "cumulative_neighbours", "normalize_neighbours", "normalize_by_frames",
               "distance_unit")

    def __init__(self, distance: int = 1, tau: float = 1.0, cumulative: bool = False,
                 normalize_neighbours: bool = False, normalize_by_frames: bool = True,
                 distance_unit: str = "latent", **common: Any) -> None:
        super().__init__(**common)
        self.distance, self.tau, self.cumulative = int(distance), float(tau), bool(cumulative)
        self.normalize_neighbours, self.normalize_by_frames = bool(normalize_neighbours), bool(normalize_by_frames)
        self.distance_unit = DistanceUnit.parse(distance_unit, "distance_unit")
        self.temporal_ratio: Optional[int] = None  # the VAE's pixel frames per latent frame, set by the caller

    @classmethod
    def from_config(cls, cfg: Any) -> "CRepaObjective":
        return cls(cfg.distance, cfg.tau, cfg.cumulative_neighbours, cfg.normalize_neighbours,
                   cfg.normalize_by_frames, cfg.distance_unit, **cls.common(cfg))

    def latent_distance(self) -> int:
        """`distance` in latent frames: as given, or from pixel frames with the VAE's temporal
        compression r: the nearest whole number of latent frames, at least 1 (0 stays 0)."""
        if self.distance_unit is DistanceUnit.latent or self.distance == 0:
            return self.distance
        if self.temporal_ratio is None:
            raise ValueError("distance_unit='pixel' needs the VAE's temporal compression (the teacher's frames)")
        return max(1, round(self.distance / self.temporal_ratio))

    def __call__(self, student: Tensor, grid_s: Grid, teacher: Tensor, grid_t: Grid, projector: nn.Module) -> AlignResult:
        if student.dim() != 4:
            raise ValueError(f"CREPA expects per-frame student tokens (B, T, N, hidden), got {tuple(student.shape)}")
        p, f = self.align(student, grid_s, teacher, grid_t, projector)  # (B, T, M, D) each
        score, self_sim = crepa_scores(p, f, self.latent_distance(), self.tau, self.cumulative, self.normalize_neighbours)
        per_video = score.mean(dim=1) if self.normalize_by_frames else score.sum(dim=1)  # (B,)
        return AlignResult(loss=-per_video.mean(), similarity=self_sim.mean().detach(),
                           terms={"score": per_video.mean().detach()})
