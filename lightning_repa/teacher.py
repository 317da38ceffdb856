"""Teacher tokens for one batch (SPEC section 4): decode the clean latents (or take the
batch's pixels), run the frozen encoder, in chunks, without gradients. No Lightning."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_repa.align import Grid
from lightning_repa.decoders import LatentDecoder, pixels_to_unit


class EncoderTeacher(nn.Module):
    """`(batch, latents) -> (tokens (B, M, D), grid (gh, gw))` from a frozen image encoder.

    `encoder` maps images (B, 3, H, W) in [0, 1] to patch tokens (B, gh*gw, D) and has
    `embed_dim` and `grid_for(H, W)`; `decoder` maps training latents to such images, or is
    None when the batch carries the images under `pixels_key`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: Optional[LatentDecoder],
        pixels_key: str = "pixels",
        pixels_range: tuple[float, float] | list[float] = (0.0, 1.0),
        batch_size: int = 0,
    ) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.pixels_key, self.pixels_range, self.batch_size = pixels_key, tuple(pixels_range), batch_size

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.embed_dim)

    def images(self, batch: Mapping[str, Any], latents: Tensor) -> Tensor:
        """Clean images (B, 3, H, W) in [0, 1]."""
        if self.decoder is None:
            return pixels_to_unit(batch[self.pixels_key], self.pixels_range)
        return torch.cat([self.decoder(z) for z in self._chunks(latents)])

    @torch.no_grad()
    def forward(self, batch: Mapping[str, Any], latents: Tensor) -> tuple[Tensor, Grid]:
        images = self.images(batch, latents)  # (B, 3, H, W)
        if images.dim() != 4:
            raise ValueError(f"teacher images must be (B, 3, H, W), got {tuple(images.shape)}")
        tokens = torch.cat([self.encoder(x) for x in self._chunks(images)])  # (B, gh*gw, D)
        return tokens, tuple(self.encoder.grid_for(*images.shape[-2:]))

    def _chunks(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(self.batch_size) if self.batch_size > 0 else (x,)
