"""The alignment losses at their public path (SPEC section 2); they live in
`lightning_repa.maths.losses` with the rest of the pure tensor maths."""

from lightning_repa.maths.losses import crepa_scores, manifold_loss, token_cosine

__all__ = ["crepa_scores", "manifold_loss", "token_cosine"]
