"""U-REPA (SPEC 6.2): `loss = -mean cosine + manifold_weight * M` on a UNet's mid-block tokens."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_repa.maths.align import Grid, TeacherTokens
from lightning_repa.choices import ManifoldScope
from lightning_repa.maths.losses import manifold_loss, token_cosine
from lightning_repa.objectives.base import AlignResult, Objective


class URepaObjective(Objective):
    """`-mean_b token_cosine(p_b, f_b) + manifold_weight * M(p, f)`, M from `losses.manifold_loss`.

    Args (besides the common ones):
        manifold_weight: weight of the manifold term (U-REPA: 3.0; 0 is 0).
        manifold_scope: "tokens" (token pairs within each sample) or "batch" (sample pairs).
    """

    options = ("manifold_weight", "manifold_scope")

    def __init__(self, manifold_weight: float = 3.0, manifold_scope: str = "tokens", **common: Any) -> None:
        super().__init__(**common)
        self.manifold_weight = float(manifold_weight)
        self.manifold_scope = ManifoldScope.parse(manifold_scope, "manifold_scope").value

    @classmethod
    def from_config(cls, cfg: Any) -> "URepaObjective":
        return cls(cfg.manifold_weight, cfg.manifold_scope, **cls.common(cfg))

    def check_batch(self, batch_size: int) -> None:
        if self.manifold_scope == ManifoldScope.batch.value and batch_size < 2:
            raise ValueError(
                f"manifold_scope='batch' compares the samples of a batch with each other, but this is a batch of "
                f"{batch_size} sample: its manifold term would be 0. Use manifold_scope='tokens' (token pairs within "
                "each sample), or batches of at least 2 (drop_last=True drops a last batch of 1)"
            )

    def __call__(self, student: Tensor, grid_s: Grid, teacher: TeacherTokens, projector: nn.Module) -> AlignResult:
        p, f = self.align(student, grid_s, teacher, projector)  # (B, M, D) each
        similarity = token_cosine(p, f).mean()  # ()
        manifold = manifold_loss(p, f, self.manifold_scope)  # ()
        loss = -similarity + self.manifold_weight * manifold
        return AlignResult(loss=loss, similarity=similarity.detach(), terms={"manifold": manifold.detach()})
