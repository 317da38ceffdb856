"""Teachers (SPEC section 4): one protocol, `teacher(batch, latents, captured) -> (tokens, grid)`.

- :class:`EncoderTeacher`: decode the clean latents (or take the batch's pixels) and run a frozen
  image encoder, in chunks, without gradients.
- :class:`BackboneTeacher`: a deeper block of the same forward, detached; no VAE, no encoder.

:func:`build_teacher` builds the one the options ask for, at one point of the lifecycle (when the
callback attaches its projector, since the projector's width is the teacher's). A wrapper (e.g. a
feature cache) only has to keep the call signature. No Lightning.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn

from lightning_repa.align import Grid, teacher_frames
from lightning_repa.capture import Captured
from lightning_repa.config import Cache, Decoder, RepaConfig, Teacher
from lightning_repa.decoders import LatentDecoder, load_tiny_decoder, pixels_to_unit
from lightning_repa.families import Family
from lightning_repa.surgery import get_path


class TeacherProtocol(Protocol):
    embed_dim: Optional[int]  # width of the teacher tokens; None: the student's own width

    def __call__(self, batch: Mapping[str, Any], latents: Tensor, captured: Captured) -> tuple[Tensor, Grid]:
        """Teacher tokens (B, M, D) row-major on the returned grid, without gradients."""
        ...

    def to(self, device: Any) -> Any:
        """Move whatever the teacher computes with to the training device."""
        ...

    def set_autocast(self, dtype: Optional[torch.dtype]) -> None:
        """Compute under autocast to `dtype` (the trainer's bf16), or None: as the caller's context has it."""
        ...


class EncoderTeacher(nn.Module):
    """`(batch, latents, captured) -> (tokens (B, M, D), grid (gh, gw))` from a frozen image encoder.

    `encoder` maps images (B, 3, H, W) in [0, 1] to patch tokens (B, gh*gw, D) and has
    `embed_dim` and `grid_for(H, W)`; `decoder` maps training latents to such images (video
    latents to frames (B, F, 3, H, W)), or is None when the batch carries the images under
    `pixels_key`. Decoding runs in chunks of `batch_size` samples, encoding in chunks of
    `batch_size` images (of video: frames), so memory stays bounded (0: all at once).
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
        self.temporal_ratio: Optional[int] = None  # pixel frames per latent frame, seen at the last video call
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
    def forward(self, batch: Mapping[str, Any], latents: Tensor, captured: Optional[Captured] = None) -> tuple[Tensor, Grid]:
        """Tokens (B, M, D) on the encoder's grid; for video latents (B, C, T, h, w), per latent frame
        (B, T, M, D), each from the pixel frame `align.teacher_frames` assigns it."""
        if self.autocast is not None:
            with torch.autocast(latents.device.type, dtype=self.autocast):
                return self._tokens(batch, latents)
        return self._tokens(batch, latents)

    def _tokens(self, batch: Mapping[str, Any], latents: Tensor) -> tuple[Tensor, Grid]:
        images = self.images(batch, latents)  # (B, 3, H, W) or (B, F, 3, H, W)
        video = latents.dim() == 5
        if images.dim() != (5 if video else 4):
            layout = "(B, F, 3, H, W) frames" if video else "(B, 3, H, W) images"
            raise ValueError(f"the teacher needs {layout} for latents {tuple(latents.shape)}, got {tuple(images.shape)}")
        if video:
            frames = teacher_frames(latents.shape[2], images.shape[1])
            self.temporal_ratio = frames[1] - frames[0] if len(frames) > 1 else 1
            images = images[:, frames].flatten(0, 1)  # (B*T, 3, H, W)
        tokens = torch.cat([self.encoder(x) for x in self._chunks(images)])  # (B[*T], gh*gw, D)
        if video:
            tokens = tokens.unflatten(0, (latents.shape[0], latents.shape[2]))  # (B, T, gh*gw, D)
        return tokens, tuple(self.encoder.grid_for(*images.shape[-2:]))

    def _chunks(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(self.batch_size) if self.batch_size > 0 else (x,)


class BackboneTeacher:
    """The tokens of a deeper block (`block_index`) of the same forward, detached, on the student grid."""

    embed_dim = None

    def __init__(self, block_index: int) -> None:
        self.block_index = block_index

    def __call__(self, batch: Mapping[str, Any], latents: Tensor, captured: Captured) -> tuple[Tensor, Grid]:
        return captured[self.block_index].detach(), captured.grid  # (B, N, hidden)

    def to(self, *args: Any, **kwargs: Any) -> "BackboneTeacher":
        return self

    def set_autocast(self, dtype: Optional[torch.dtype]) -> None:
        """Nothing to do: its tokens come from the student's own forward, under the trainer's precision."""


def build_teacher(
    cfg: RepaConfig, family: Family, module: nn.Module, build_encoder: Callable[[], nn.Module]
) -> TeacherProtocol:
    """The teacher the options ask for; `module` (the LightningModule) holds the VAE at `vae_attr`."""
    if cfg.teacher is Teacher.backbone:
        return BackboneTeacher(cfg.teacher_block_index)
    teacher = EncoderTeacher(
        build_encoder(), _build_decoder(cfg, family, module), cfg.pixels_key, cfg.pixels_range, cfg.encoder_batch_size
    )
    if cfg.cache is Cache.none:
        return teacher
    from lightning_repa.cache import CachedTeacher, DiskStore, MemoryStore, cache_metadata  # wraps the teacher

    store = MemoryStore() if cfg.cache is Cache.memory else DiskStore(cfg.cache_dir, cache_metadata(cfg, teacher))
    return CachedTeacher(teacher, store, cfg.ids_key, cfg.views_key)


def _build_decoder(cfg: RepaConfig, family: Family, module: nn.Module) -> Optional[LatentDecoder]:
    if cfg.decoder is Decoder.pixels:
        return None
    vae = get_path(module, cfg.vae_attr)
    if vae is None and (cfg.decoder is Decoder.vae or family.latent_format == "flux2"):
        raise ValueError(
            f"decoder={cfg.decoder.value} for family={family.name!r} needs the VAE at `vae_attr`={cfg.vae_attr!r} "
            f"on {type(module).__name__}; attach it there, set `vae_attr`, or use decoder=pixels"
        )
    tae = load_tiny_decoder(cfg.tae_checkpoint, family.latent_format) if cfg.decoder is Decoder.tae else None
    return LatentDecoder(cfg.decoder, family.latent_format, vae=vae, tae=tae)
