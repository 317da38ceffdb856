"""Token resampling at its public path (SPEC section 2); it lives in `lightning_repa.maths.align`
with the rest of the pure tensor maths."""

from lightning_repa.maths.align import map_to_tokens, pool_tokens, resample_tokens, tokens_to_map

__all__ = ["map_to_tokens", "pool_tokens", "resample_tokens", "tokens_to_map"]
