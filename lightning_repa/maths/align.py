"""Putting student and teacher tokens on one grid (SPEC section 5): pure tensor maths.

Tokens are always (..., N, D), laid out row-major on a known (H, W) grid; grids come from
the latent shape and the encoder input, never from the token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

Grid = tuple[int, int]


@dataclass
class TeacherTokens:
    """What a teacher hands the objective for one micro-batch: tokens row-major on a known grid.

    `tokens` are (B, M, D), or per latent frame (B, T', M, D) for video; `grid` is the (gh, gw)
    of one frame's tokens; `frames_per_latent` is the VAE's temporal compression r (pixel frames
    per latent frame) when the tokens come from decoded or given video frames, else None.
    """

    tokens: Tensor  # (B, M, D) or (B, T', M, D), without gradients
    grid: Grid
    frames_per_latent: Optional[int] = None


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


def per_frame(x: Tensor, grid: tuple[int, ...]) -> tuple[Tensor, Grid]:
    """Video tokens (B, T'*H'*W', D) on a (T', H', W') grid -> per frame (B, T', H'*W', D) and (H', W')
    (frame-major, row-major in a frame). Tokens on a 2-D grid are returned as they are."""
    if len(grid) == 2:
        return x, (int(grid[0]), int(grid[1]))
    t, h, w = grid
    return x.reshape(x.shape[0], t, h * w, x.shape[-1]), (h, w)


def teacher_frames(latent_frames: int, pixel_frames: int, ratio: int) -> list[int]:
    """The pixel frame each latent frame is aligned with (SPEC 5), for a causal video VAE of temporal
    compression `ratio` (r): latent frame 0 holds pixel frame 0 (encoded alone) and latent frame
    t >= 1 the frames (t-1)*r+1 .. t*r, of which the last, t*r, is taken. A clip longer than
    1 + (T-1)*r frames loses its tail (the encoder drops those frames too); one pixel frame per latent
    frame (F == T) is taken as it is. A 9-frame clip of a 4x VAE: latent frames 0, 1, 2 <- pixel
    frames 0, 4, 8; an 8-frame clip: 2 latent frames <- 0, 4 (frame 7 dropped).
    """
    if pixel_frames == latent_frames:
        return list(range(latent_frames))
    need = 1 + (latent_frames - 1) * ratio
    if pixel_frames < need:
        raise ValueError(
            f"{pixel_frames} pixel frames are too few for {latent_frames} latent frames: a video VAE of temporal "
            f"compression {ratio} makes them from 1 + ({latent_frames} - 1) * {ratio} = at least {need} frames (or "
            "give one pixel frame per latent frame); `frames_per_latent` sets the compression"
        )
    return [t * ratio for t in range(latent_frames)]
