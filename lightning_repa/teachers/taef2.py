"""Tiny autoencoders (madebyollin/taesd, MIT) for the FLUX.2 and Sana latent spaces.

The pretrained files are plain ``nn.Sequential`` state dicts, so the modules below are
``nn.Sequential`` subclasses whose positions and submodule names reproduce the keys
exactly (``load_state_dict(sd, strict=True)`` succeeds). Conventions:

- images are in [0, 1] (not [-1, 1]);
- TAEF2 latents have 32 channels at 1/8 of the image size, scale factor 1;
- the TAEF2 decoder starts with a soft clamp ``tanh(x / 3) * 3`` and returns an image
  roughly in [0, 1] (callers clamp it; the module does not);
- the TAESANA encoder maps to 32 channels at 1/32 of the image size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import Tensor, nn

__all__ = ["Block", "TAEF2Encoder", "TAEF2Decoder", "load_tae"]


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    """3x3 convolution with padding 1 (the only kernel size the TAEs use besides 1x1)."""
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


def _down(c: int = 64) -> nn.Conv2d:
    """Stride-2 3x3 convolution without bias: halves H and W."""
    return _conv(c, c, stride=2, bias=False)


class Clamp(nn.Module):
    """Soft clamp ``tanh(x / 3) * 3`` applied to latents before decoding."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block ``fuse(conv(x) + skip(x))``.

    With ``pool=True`` (lowest-resolution blocks of TAEF2) it first computes
    ``x = x + pool(x)``, where pool is 1x1 conv -> GroupNorm(4) -> ReLU -> 1x1 conv.
    """

    def __init__(self, n_in: int, n_out: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Module | None = None
        if pool:
            n_gn = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, n_gn, 1, bias=False),
                nn.GroupNorm(4, n_gn),
                nn.ReLU(),
                nn.Conv2d(n_gn, n_in, 1, bias=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _blocks(n: int, c: int = 64, pool: bool = False) -> list[nn.Module]:
    """``n`` channel-preserving blocks."""
    return [Block(c, c, pool=pool) for _ in range(n)]


class TAEF2Encoder(nn.Sequential):
    """TAEF2 encoder: image (B, 3, H, W) in [0, 1] -> latents (B, 32, H/8, W/8)."""

    def __init__(self, latent_channels: int = 32) -> None:
        super().__init__(
            _conv(3, 64), *_blocks(1),  # 0-1: (B, 64, H, W)
            _down(), *_blocks(3),  # 2-5: (B, 64, H/2, W/2)
            _down(), *_blocks(3),  # 6-9: (B, 64, H/4, W/4)
            _down(), *_blocks(3, pool=True),  # 10-13: (B, 64, H/8, W/8)
            _conv(64, latent_channels),  # 14: (B, 32, H/8, W/8)
        )


class TAEF2Decoder(nn.Sequential):
    """TAEF2 decoder: latents (B, 32, h, w) -> image (B, 3, 8h, 8w), roughly in [0, 1]."""

    def __init__(self, latent_channels: int = 32) -> None:
        super().__init__(
            Clamp(), _conv(latent_channels, 64), nn.ReLU(),  # 0-2: (B, 64, h, w)
            *_blocks(3, pool=True), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),  # 3-7: (B, 64, 2h, 2w)
            *_blocks(3), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),  # 8-12: (B, 64, 4h, 4w)
            *_blocks(3), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),  # 13-17: (B, 64, 8h, 8w)
            *_blocks(1), _conv(64, 3),  # 18-19: (B, 3, 8h, 8w)
        )


_KINDS: Dict[str, Callable[[], nn.Module]] = {
    "taef2_encoder": TAEF2Encoder,
    "taef2_decoder": TAEF2Decoder,
}


def load_tae(path: str | os.PathLike, kind: str) -> nn.Module:
    """Build the ``kind`` module, load ``path`` strictly (fp16 -> fp32), return it frozen in eval.

    Raises FileNotFoundError for a missing file, ValueError for an unknown ``kind`` or for a
    state dict whose keys do not match the architecture (missing and unexpected keys listed).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown TAE kind {kind!r}; expected one of {sorted(_KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TAE weights file not found: {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    module = _KINDS[kind]()
    missing = sorted(set(module.state_dict()) - set(sd))
    unexpected = sorted(set(sd) - set(module.state_dict()))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the {kind!r} architecture: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # same keys, wrong shapes
        raise ValueError(f"{path} does not match the {kind!r} architecture: {e}") from e
    return module.eval().requires_grad_(False)
