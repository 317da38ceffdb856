"""Putting student and teacher tokens on one grid (SPEC section 5): pure tensor maths.

Tokens are always (..., N, D), laid out row-major on a known (H, W) grid; grids come from
the latent shape and the encoder input, never from the token count.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

Grid = tuple[int, int]


def resample_tokens(x: Tensor, src_hw: Grid, dst_hw: Grid) -> Tensor:
    """Resample tokens from grid `src_hw` to grid `dst_hw`, 2-D bilinear.

    x: (..., H*W, D) row-major on `src_hw`; returns (..., H'*W', D) on `dst_hw`.
    Antialiased along any axis that shrinks, so a 2:1 grid stays 2:1 and no row wraps into
    the next (the 1-D interpolation over the flattened raster of the reference does).
    """
    (sh, sw), (dh, dw) = tuple(src_hw), tuple(dst_hw)
    if x.shape[-2] != sh * sw:
        raise ValueError(f"resample_tokens: {x.shape[-2]} tokens do not fill the source grid {sh}x{sw}")
    if (sh, sw) == (dh, dw):
        return x
    lead, dim = x.shape[:-2], x.shape[-1]
    img = x.reshape(-1, sh, sw, dim).permute(0, 3, 1, 2)  # (B', D, H, W)
    shrink = dh < sh or dw < sw
    out = F.interpolate(img.float(), size=(dh, dw), mode="bilinear", align_corners=False, antialias=shrink)
    out = out.to(x.dtype).permute(0, 2, 3, 1).reshape(*lead, dh * dw, dim)  # (..., H'*W', D)
    return out


def pool_tokens(x: Tensor) -> Tensor:
    """Mean-pool all tokens of a frame to one: (..., N, D) -> (..., 1, D) (spatial_align=False)."""
    return x.mean(dim=-2, keepdim=True)


def tokens_to_map(x: Tensor, hw: Grid) -> Tensor:
    """(B, H*W, D) row-major -> (B, D, H, W) feature map."""
    h, w = hw
    if x.shape[-2] != h * w:
        raise ValueError(f"tokens_to_map: {x.shape[-2]} tokens do not fill the grid {h}x{w}")
    return x.reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)


def map_to_tokens(x: Tensor) -> Tensor:
    """(B, D, H, W) feature map -> (B, H*W, D) row-major tokens."""
    return x.flatten(2).transpose(1, 2)
