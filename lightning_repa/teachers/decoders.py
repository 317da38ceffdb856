"""From the batch's clean latents to clean images in [0, 1] (SPEC section 4): no Lightning.

The latents arrive in the *training space* of the family (scaled, shifted, normalised,
patchified, exactly as diffusers training scripts cache them). A decoder first undoes that
transform to get the raw VAE latents (`to_raw_latents`), then decodes:

- `vae`: the full VAE, `vae.decode(raw).sample` in [-1, 1];
- `tae`: a tiny autoencoder. FLUX.2's TAEF2 (a taesd .pth file) is distilled on the raw VAE
  latents; a diffusers `AutoencoderTiny` (TAESD, TAESDXL, TAESD3, TAEF1: a directory) decodes the
  diffusion-space latents directly, with its own config's scaling (1.0 and 0.0 when published);
- `pixels`: nothing to decode, the batch holds the images.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_repa.choices import Decoder
from lightning_repa.teachers.pixels import unit_clamp

LatentTransform = Callable[[Tensor, Any], Tensor]


def _cfg(vae: Any, key: str) -> Any:
    config = getattr(vae, "config", None)
    return getattr(config, key, None) if config is not None else None


def _buffer(module: Any, name: str) -> Optional[Tensor]:
    """A buffer registered on `module` itself (never a config value read through the module, which
    diffusers deprecates with a FutureWarning)."""
    buffers = dict(module.named_buffers(recurse=False)) if isinstance(module, nn.Module) else {}
    return buffers.get(name)


def _kl_to_raw(z: Tensor, vae: Any) -> Tensor:
    """`z * std / sf + mean` where the VAE defines per-channel latents_mean/std (in its config: SDXL,
    Wan, SanaVideo, pipeline_wan.py; as buffers: LTX-Video, `_denormalize_latents`), else
    `z / sf + shift` (pipeline_flux.py, pipeline_stable_diffusion_3.py, Kandinsky 5's HunyuanVideo
    VAE). Images (B, C, h, w) and videos (B, C, T, h, w) alike."""
    if vae is None:
        raise ValueError("undoing the latent scaling needs the VAE's config: attach the VAE (`vae_attr`)")
    sf = _cfg(vae, "scaling_factor") or 1.0
    mean, std = (_cfg(vae, k) if _cfg(vae, k) is not None else _buffer(vae, k) for k in ("latents_mean", "latents_std"))
    if mean is not None and std is not None:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        mean = torch.as_tensor(mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.as_tensor(std, dtype=z.dtype, device=z.device).view(shape)
        return z * std / sf + mean
    return z / sf + (_cfg(vae, "shift_factor") or 0.0)


def unpatchify_2x2(z: Tensor) -> Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w), the inverse of FLUX.2's `_patchify_latents`."""
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, h, 2, w, 2)
    return z.reshape(b, c4 // 4, 2 * h, 2 * w)


def patchify_2x2(z: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), FLUX.2's `_patchify_latents`."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
    return z.reshape(b, c * 4, h // 2, w // 2)


def _flux2_stats(vae: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    bn = getattr(vae, "bn", None)
    if bn is None or getattr(bn, "running_mean", None) is None:
        raise ValueError(
            "FLUX.2 latents are normalised with the VAE's BatchNorm statistics (`vae.bn`): attach the "
            "AutoencoderKLFlux2 (or any object with its `bn`) at `vae_attr`, also with decoder=tae"
        )
    eps = _cfg(vae, "batch_norm_eps") or bn.eps
    mean = bn.running_mean.view(1, -1, 1, 1).to(like)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(like)
    return mean, std


def _flux2_to_raw(z: Tensor, vae: Any) -> Tensor:
    """FLUX.2 (pipeline_flux2.py): `z * sqrt(var + eps) + mean`, then unpatchify 2x2."""
    mean, std = _flux2_stats(vae, z)
    return unpatchify_2x2(z * std + mean)  # (B, C, 2h, 2w)


def flux2_from_raw(raw: Tensor, vae: Any) -> Tensor:
    """Raw FLUX.2 latents (B, C, H, W) -> training space (B, 4C, H/2, W/2) (for tests and data prep)."""
    z = patchify_2x2(raw)
    mean, std = _flux2_stats(vae, z)
    return (z - mean) / std


def _qwenimage_to_raw(z: Tensor, vae: Any) -> Tensor:
    """Qwen-Image (pipeline_qwenimage.py): per-channel `z * std + mean`, on the video VAE's one-frame
    layout (B, C, 1, h, w); the decoded (B, 1, 3, H, W) frame is taken back as an image."""
    return _kl_to_raw(z, vae).unsqueeze(2)


LATENT_FORMATS: dict[str, LatentTransform] = {"kl": _kl_to_raw, "flux2": _flux2_to_raw, "qwenimage": _qwenimage_to_raw}


def to_raw_latents(z: Tensor, latent_format: str, vae: Any) -> Tensor:
    """Undo the family's training-space transform: training latents -> raw VAE latents."""
    if latent_format not in LATENT_FORMATS:
        raise ValueError(f"unknown latent format {latent_format!r}; known: {sorted(LATENT_FORMATS)}")
    return LATENT_FORMATS[latent_format](z, vae)


class LatentDecoder(nn.Module):
    """Frozen `latents -> images (B, 3, H, W) in [0, 1]` for one family and decoder kind.

    `vae` is only read (config, BatchNorm stats) and used for decoding with decoder=vae; it is
    not registered as a submodule, so it is neither checkpointed nor DDP-wrapped by us.
    """

    def __init__(self, kind: Decoder, latent_format: str, vae: Any = None, tae: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.kind = Decoder.parse(kind, "decoder")
        self.latent_format = latent_format
        self._vae = [vae]  # a list hides it from nn.Module registration
        self.tae = tae
        if self.kind is Decoder.vae and vae is None:
            raise ValueError("decoder=vae needs the VAE on the LightningModule (`vae_attr`)")
        if self.kind is Decoder.tae and tae is None:
            raise ValueError("decoder=tae needs a tiny autoencoder (`tae_checkpoint`)")
        if latent_format not in LATENT_FORMATS:
            raise ValueError(f"unknown latent format {latent_format!r}; known: {sorted(LATENT_FORMATS)}")

    @property
    def vae(self) -> Any:
        return self._vae[0]

    @torch.no_grad()
    def forward(self, latents: Tensor) -> Tensor:
        if self.kind is Decoder.tae and hasattr(self.tae, "decode"):  # a diffusers AutoencoderTiny
            return _decode(self.tae, _autoencoder_tiny_input(latents, self.tae))
        raw = to_raw_latents(latents, self.latent_format, self.vae)
        if self.kind is Decoder.vae:
            images = _decode(self.vae, raw)  # (B, 3, H, W), or frames (B, F, 3, H, W)
            return images[:, 0] if latents.dim() == 4 and images.dim() == 5 else images  # one-frame VAE
        return unit_clamp(self.tae(raw.float()).float())  # TAEF2: raw latents -> [0, 1]


def _autoencoder_tiny_input(z: Tensor, tae: Any) -> Tensor:
    """TAESD/TAESDXL/TAESD3/TAEF1 decode the *diffusion-space* latents, as the pipelines feed them
    (`z / sf + shift` with the tiny model's own config, 1.0 and 0.0 for the published weights)."""
    return z / (_cfg(tae, "scaling_factor") or 1.0) + (_cfg(tae, "shift_factor") or 0.0)


def _decode(autoencoder: Any, z: Tensor) -> Tensor:
    """`autoencoder.decode(z).sample` in [-1, 1] -> [0, 1]; in full precision when the VAE asks for it
    (`force_upcast`: the SDXL VAE overflows in float16). Video latents (B, C, T, h, w) give frames
    (B, F, 3, H, W) (the VAE's (B, 3, F, H, W), frames first)."""
    upcast = bool(_cfg(autoencoder, "force_upcast"))
    autocast = torch.is_autocast_enabled(z.device.type) and not upcast
    z = z.to(next(autoencoder.parameters()).dtype)
    extra = {}
    if _cfg(autoencoder, "timestep_conditioning"):  # LTX-Video 0.9.1+: the pipeline's decode_timestep, 0
        extra["temb"] = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
    with torch.autocast(device_type=z.device.type, enabled=autocast):
        images = autoencoder.decode(z, **extra).sample.float()
    images = unit_clamp((images + 1) / 2)
    return images.transpose(1, 2) if images.dim() == 5 else images  # (B, F, 3, H, W) for video


def load_tiny_decoder(path: str | os.PathLike, latent_format: str) -> nn.Module:
    """The tiny decoder named by `tae_checkpoint`, frozen.

    A directory is a diffusers `AutoencoderTiny` (`from_pretrained`, local files only); a file
    is a taesd-style state dict of the family's own tiny decoder (FLUX.2: TAEF2).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"`tae_checkpoint` {path!r} does not exist")
    if os.path.isdir(path):
        from diffusers import AutoencoderTiny

        tae = AutoencoderTiny.from_pretrained(path, local_files_only=True)
    elif latent_format == "flux2":
        from lightning_repa.teachers.taef2 import load_tae

        tae = load_tae(path, "taef2_decoder")
    else:
        raise ValueError(
            f"`tae_checkpoint` {path!r} is a file, but only FLUX.2's TAEF2 is read from a taesd .pth file; "
            "for this family give a diffusers AutoencoderTiny directory (e.g. a saved madebyollin/taesd3)"
        )
    return tae.eval().requires_grad_(False)


def drop_vae_encoder(vae: Any, vae_attr: str = "vae") -> None:
    """Free the VAE's encoder (training on cached latents never encodes); idempotent.

    Checkpoints written before the drop still load: their encoder keys are discarded.
    """
    if vae is None:
        raise ValueError(f"`drop_vae_encoder` found no VAE at `vae_attr`={vae_attr!r}; attach it there or set vae_attr")
    for name in ("encoder", "quant_conv"):
        if isinstance(getattr(vae, name, None), nn.Module):
            setattr(vae, name, None)
    if not getattr(vae, "_repa_encoder_dropped", False):
        vae.register_load_state_dict_pre_hook(_discard_encoder_keys)
        vae._repa_encoder_dropped = True


def _discard_encoder_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith((prefix + "encoder.", prefix + "quant_conv."))]:
        del state_dict[key]
