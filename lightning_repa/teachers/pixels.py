"""The batch's clean images, as the teacher reads them with `decoder="pixels"` (SPEC section 4).
No Lightning.

Images are float tensors in `pixels_range` ([0, 1], or [-1, 1]), or uint8 in 0..255 (what
`torchvision.io.read_image` returns), which are divided by 255 (torchvision's
`to_dtype(..., scale=True)` rule) whatever `pixels_range` says; other integer dtypes are refused.
Clips are (B, F, 3, H, W), frames first. `check_pixel_range` looks at the first batch of a fit: float
pixels clearly outside the declared range are refused before the first optimizer step.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor

SLACK = 0.1
"""How far (as a fraction of the declared range) pixels may overshoot it, e.g. after a bicubic resize."""


def unit_clamp(images: Tensor) -> Tensor:
    """Clamp to [0, 1], except that NaN and infinities become NaN: a corrupt image must stay visible
    to the non-finite check of the callback (a clamped infinity would pass as white)."""
    return torch.where(torch.isfinite(images), images.clamp(0, 1), torch.nan)


def pixels_to_unit(pixels: Tensor, pixels_range: Sequence[float]) -> Tensor:
    """Batch images in `pixels_range` ([0, 1] or [-1, 1]), or uint8 in 0..255 -> [0, 1]."""
    if pixels.dtype == torch.uint8:
        return pixels.float() / 255.0
    if not pixels.is_floating_point():
        raise TypeError(
            f"the batch's pixels are {pixels.dtype}: give float images in `pixels_range` or uint8 images in 0..255 "
            "(divided by 255), e.g. pixels.float() / 255 for 0..255 integers"
        )
    lo, hi = float(pixels_range[0]), float(pixels_range[1])
    return unit_clamp((pixels.float() - lo) / (hi - lo))


def check_pixel_range(pixels: Tensor, pixels_range: Sequence[float], key: str) -> None:
    """Refuse float pixels clearly outside `pixels_range` (one host sync: call it on a fit's first
    batch); warn when [-1, 1] is declared and no pixel is negative (images in [0, 1]?)."""
    pixels_to_unit(pixels[:1], pixels_range)  # the dtype rule
    if not pixels.is_floating_point():
        return
    finite = pixels[torch.isfinite(pixels)]
    if finite.numel() == 0:
        return  # nothing to measure; the non-finite check skips the step
    lo, hi = float(pixels_range[0]), float(pixels_range[1])
    seen = (float(finite.min()), float(finite.max()))
    slack = SLACK * (hi - lo)
    if seen[0] < lo - slack or seen[1] > hi + slack:
        fix = "pixels_range=[-1, 1]" if seen[0] >= -1 - slack and seen[1] <= 1 + slack else (
            "pixels / 255 (0..255 floats), or uint8 images")
        raise ValueError(
            f"`pixels_range`=[{lo:g}, {hi:g}], but batch[{key!r}] holds pixels in [{seen[0]:.4g}, {seen[1]:.4g}]: the "
            f"teacher would see them clipped. Declare the range your images have, pixels_range=[0, 1] or "
            f"pixels_range=[-1, 1], or rescale them (here: {fix})"
        )
    if lo < 0 and seen[0] >= 0:
        warnings.warn(
            f"batch[{key!r}]: no pixel of the first batch is negative under `pixels_range`=[-1, 1]; if the images are "
            "in [0, 1], set pixels_range=[0, 1] (else the teacher sees them washed out)", UserWarning, stacklevel=2
        )


def check_clip_layout(shape: Sequence[int], key: str) -> None:
    """Clips are (B, F, 3, H, W), frames first; channel-first clips, and 3-frame clips (whose two layouts
    have one shape), are refused."""
    if len(shape) != 5:
        raise ValueError(f"batch[{key!r}] of a video family must be clips (B, F, 3, H, W), got shape {tuple(shape)}")
    if shape[2] != 3 or shape[1] == 3:
        why = ("a clip of 3 frames reads the same in both layouts, (B, F, 3, H, W) and (B, 3, F, H, W)"
               if shape[2] == 3 else f"dimension 2 has {shape[2]} entries, not the 3 colours")
        raise ValueError(
            f"batch[{key!r}] has shape {tuple(shape)}: clips are read as (B, F, 3, H, W), frames first, and {why}. "
            "Give frames first (channel-first clips: pixels.permute(0, 2, 1, 3, 4)), with a number of frames "
            "other than 3 (e.g. 1 + (T - 1) * r for T latent frames)"
        )
