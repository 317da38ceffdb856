"""CREPA (SPEC 6.3): per-frame alignment of a video DiT with its own and its neighbours' frames."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from lightning_repa.maths.align import Grid, TeacherTokens
from lightning_repa.choices import DistanceUnit
from lightning_repa.maths.losses import crepa_scores
from lightning_repa.objectives.base import AlignResult, Objective


class CRepaObjective(Objective):
    """`loss = -mean_b per_video[b]`, `per_video[b]` the frames' neighbour-augmented scores
    (`losses.crepa_scores`) averaged over frames (summed with `normalize_by_frames=False`).

    Tokens are per frame: student (B, T, N, hidden), teacher (B, T, M, D). The similarity fed
    to the cutoff is the mean self-similarity; `terms["score"]` the mean per-video score.

    Args (besides the common ones): `distance`, `tau`, `cumulative`, `normalize_neighbours`,
    `normalize_by_frames`, `distance_unit`: see `RepaConfig`. A distance in pixel frames is
    converted with the teacher's `frames_per_latent` (the VAE's temporal compression).
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

    @classmethod
    def from_config(cls, cfg: Any) -> "CRepaObjective":
        return cls(cfg.distance, cfg.tau, cfg.cumulative_neighbours, cfg.normalize_neighbours,
                   cfg.normalize_by_frames, cfg.distance_unit, **cls.common(cfg))

    def latent_distance(self, frames_per_latent: Optional[int]) -> int:
        """`distance` in latent frames: as given, or from pixel frames with the VAE's temporal
        compression r (`frames_per_latent`): the nearest whole number of latent frames, at least 1
        (0 stays 0)."""
        if self.distance_unit is DistanceUnit.latent or self.distance == 0:
            return self.distance
        if frames_per_latent is None:
            raise ValueError("distance_unit='pixel' needs the VAE's temporal compression (the teacher's frames)")
        return max(1, round(self.distance / frames_per_latent))

    def __call__(self, student: Tensor, grid_s: Grid, teacher: TeacherTokens, projector: nn.Module) -> AlignResult:
        if student.dim() != 4:
            raise ValueError(f"CREPA expects per-frame student tokens (B, T, N, hidden), got {tuple(student.shape)}")
        p, f = self.align(student, grid_s, teacher, projector)  # (B, T, M, D) each
        distance = self.latent_distance(teacher.frames_per_latent)
        score, self_sim = crepa_scores(p, f, distance, self.tau, self.cumulative, self.normalize_neighbours)
        per_video = score.mean(dim=1) if self.normalize_by_frames else score.sum(dim=1)  # (B,)
        return AlignResult(loss=-per_video.mean(), similarity=self_sim.mean().detach(),
                           terms={"score": per_video.mean().detach()})
