"""The encoder teacher (SPEC section 4): decode the clean latents (or take the batch's pixels) and
run a frozen image encoder on them, in chunks, without gradients. No Lightning."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_repa.maths.align import TeacherTokens, teacher_frames
from lightning_repa.models.capture import Captured
from lightning_repa.teachers.decoders import LatentDecoder
from lightning_repa.teachers.pixels import check_clip_layout, pixels_to_unit


class EncoderTeacher(nn.Module):
    """`(batch, latents, captured) -> TeacherTokens` from a frozen image encoder.

    `encoder` maps images (B, 3, H, W) in [0, 1] to patch tokens (B, gh*gw, D) and has
    `embed_dim` and `grid_for(H, W)`; `decoder` maps training latents to such images (video
    latents to frames (B, F, 3, H, W)), or is None when the batch carries the images under
    `pixels_key`. Decoding runs in chunks of `batch_size` samples, encoding in chunks of
    `batch_size` images (of video: frames), so memory stays bounded (0: all at once). For video,
    `frames_per_latent` is the VAE's temporal compression (`maths.align.teacher_frames`).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: Optional[LatentDecoder],
        pixels_key: str = "pixels",
        pixels_range: tuple[float, float] | list[float] = (0.0, 1.0),
        batch_size: int = 0,
        frames_per_latent: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.pixels_key, self.pixels_range, self.batch_size = pixels_key, tuple(pixels_range), batch_size
        self.frames_per_latent = frames_per_latent
        self.autocast: Optional[torch.dtype] = None  # decode and encode under this autocast dtype (bf16 trainers)

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.embed_dim)

    def set_autocast(self, dtype: Optional[torch.dtype]) -> None:
        """Decode and encode under autocast to `dtype` (the trainer's bf16), or as the caller's context has it."""
        self.autocast = dtype

    def source(self, batch: Mapping[str, Any], latents: Tensor) -> Tensor:
        """What the teacher's features are a function of: the batch's pixels, or the clean latents."""
        return batch[self.pixels_key] if self.decoder is None else latents

    def images(self, batch: Mapping[str, Any], latents: Tensor) -> Tensor:
        """Clean images (B, 3, H, W), or video frames (B, F, 3, H, W), in [0, 1]."""
        if self.decoder is None:
            return pixels_to_unit(batch[self.pixels_key], self.pixels_range)
        return torch.cat([self.decoder(z) for z in self._chunks(latents)])

    @torch.no_grad()
    def forward(self, batch: Mapping[str, Any], latents: Tensor, captured: Optional[Captured] = None) -> TeacherTokens:
        """Tokens (B, M, D) on the encoder's grid; for video latents (B, C, T, h, w), per latent frame
        (B, T, M, D), each from the pixel frame `maths.align.teacher_frames` assigns it."""
        if self.autocast is not None:
            with torch.autocast(latents.device.type, dtype=self.autocast):
                return self._tokens(batch, latents)
        return self._tokens(batch, latents)

    def _tokens(self, batch: Mapping[str, Any], latents: Tensor) -> TeacherTokens:
        video = latents.dim() == 5
        if video and self.decoder is None:
            check_clip_layout(batch[self.pixels_key].shape, self.pixels_key)
        images = self.images(batch, latents)  # (B, 3, H, W) or (B, F, 3, H, W)
        if images.dim() != (5 if video else 4):
            layout = "(B, F, 3, H, W) frames" if video else "(B, 3, H, W) images"
            raise ValueError(f"the teacher needs {layout} for latents {tuple(latents.shape)}, got {tuple(images.shape)}")
        if video:
            frames = teacher_frames(latents.shape[2], images.shape[1], self.frames_per_latent or 1)
            images = images[:, frames].flatten(0, 1)  # (B*T, 3, H, W)
        tokens = torch.cat([self.encoder(x) for x in self._chunks(images)])  # (B[*T], gh*gw, D)
        if video:
            tokens = tokens.unflatten(0, (latents.shape[0], latents.shape[2]))  # (B, T, gh*gw, D)
        return TeacherTokens(tokens, tuple(self.encoder.grid_for(*images.shape[-2:])), self.frames_per_latent)

    def _chunks(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(self.batch_size) if self.batch_size > 0 else (x,)
