"""Building the teacher the options ask for, at one point of the lifecycle (when the callback
attaches its projector, whose width is the teacher's). No Lightning."""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from lightning_repa.choices import Cache, Decoder, Teacher
from lightning_repa.config import RepaConfig
from lightning_repa.models.families import Family
from lightning_repa.models.surgery import get_path
from lightning_repa.teachers.backbone import BackboneTeacher
from lightning_repa.teachers.decoders import LatentDecoder, load_tiny_decoder
from lightning_repa.teachers.encoder_teacher import EncoderTeacher
from lightning_repa.teachers.encoders import load_encoder
from lightning_repa.teachers.protocol import TeacherProtocol


def load_config_encoder(cfg: RepaConfig) -> nn.Module:
    """The frozen image encoder the options name (`encoder`, `encoder_image_size`, `encoder_checkpoint`)."""
    return load_encoder(cfg.encoder, image_size=cfg.encoder_image_size, checkpoint=cfg.encoder_checkpoint)


def build_teacher(
    cfg: RepaConfig, family: Family, module: nn.Module, build_encoder: Callable[[], nn.Module]
) -> TeacherProtocol:
    """The teacher the options ask for; `module` (the LightningModule) holds the VAE at `vae_attr`."""
    if cfg.teacher is Teacher.backbone:
        return BackboneTeacher(cfg.teacher_block_index)
    teacher = EncoderTeacher(
        build_encoder(), _build_decoder(cfg, family, module), cfg.pixels_key, cfg.pixels_range, cfg.encoder_batch_size,
        temporal_compression(cfg, family, get_path(module, cfg.vae_attr)),
    )
    if cfg.cache is Cache.none:
        return teacher
    from lightning_repa.teachers.cache import CachedTeacher, DiskStore, MemoryStore, cache_metadata

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


def temporal_compression(cfg: RepaConfig, family: Family, vae: Any) -> Optional[int]:
    """A video family's pixel frames per latent frame: the attached VAE's (config
    `temporal_compression_ratio`, or Wan's `2 ** sum(temperal_downsample)`), else `frames_per_latent`,
    else the family's; None for image families. An option that contradicts the VAE is an error."""
    if not family.video:
        return None
    config = getattr(vae, "config", None) or {}
    ratio = config.get("temporal_compression_ratio")  # HunyuanVideo (1.5), LTX-2
    if ratio is None and vae is not None:
        ratio = vars(vae).get("temporal_compression_ratio")  # LTX-Video sets it on the instance
    if ratio is None and config.get("temperal_downsample") is not None:  # Wan (and SANA-Video's Wan VAE)
        ratio = 2 ** sum(bool(x) for x in config["temperal_downsample"])
    if ratio is not None and cfg.frames_per_latent not in (None, ratio):
        raise ValueError(f"`frames_per_latent`={cfg.frames_per_latent}, but the VAE at `vae_attr`={cfg.vae_attr!r} "
                         f"compresses {ratio} pixel frames into one latent frame: remove the option")
    return int(ratio or cfg.frames_per_latent or family.temporal_compression)
