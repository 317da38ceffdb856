"""Frozen vision encoders (the REPA teacher); public as `lightning_repa.encoders`.

SPEC section 4. The teacher tokens are the **patch tokens** of the
final normed features of a timm ViT (prefix tokens, i.e. CLS and registers,
dropped; SPEC 12.1), computed on images resized so that the token grid keeps
the image's aspect ratio (SPEC 12.2).

Weights come either from a local file (`encoder_checkpoint`: the official
DINOv2 release `.pth`, a timm `.safetensors`, or a DINOv2 training checkpoint)
or from the Hugging Face hub through timm. When the hub cannot be reached the
hub path fails fast with a message that names `encoder_checkpoint`.

No Lightning imports here: this module is usable on its own.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_repa.teachers.checkpoints import checkpoint_path, load_into, read_checkpoint
from lightning_repa.teachers.hub import create_pretrained

__all__ = [
    "ENCODER_ALIASES",
    "FrozenEncoder",
    "load_encoder",
    "resolve_encoder_name",
]

# torch.hub names of the DINOv2 release -> timm architectures.
ENCODER_ALIASES: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "dinov2_vitg14": "vit_giant_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2",
}



# --------------------------------------------------------------------------- names


def resolve_encoder_name(name: str) -> str:
    """Map an alias (`dinov2_vits14`, ...) to its timm name; check any other name exists in timm.

    Raises ValueError naming the `encoder` option, with close names, when timm
    does not know the model.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`encoder` must be a non-empty model name, got {name!r}; e.g. encoder='dinov2_vits14'.")
    name = name.strip()
    if name.lower() in ENCODER_ALIASES:
        return ENCODER_ALIASES[name.lower()]
    if ":" in name:  # 'hf-hub:org/repo' or 'local-dir:/path': timm resolves these itself
        return name
    arch, _tag = timm.models.split_model_name_tag(name)
    if timm.models.is_model(arch):
        return name
    candidates = list(ENCODER_ALIASES) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"`encoder`={name!r} is neither a DINOv2 alias ({', '.join(ENCODER_ALIASES)}) nor a timm model name."
        f"{hint} Any timm ViT name works, e.g. encoder='vit_small_patch14_dinov2'."
    )


# --------------------------------------------------------------------------- image size


def _nearest_multiples(value: int, step: int) -> list[int]:
    """The multiples of `step` just below and above `value` (never below `step`)."""
    low = max(step, (value // step) * step)
    high = low if low >= value else low + step
    return sorted({low, high})


def _check_positive_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(
            f"`encoder_image_size` must be a positive int (a multiple of the encoder's patch size), "
            f"got {image_size!r}; e.g. encoder_image_size=224 for DINOv2 (16x16 tokens)."
        )


def _check_image_size(image_size: int, patch_size: int) -> None:
    """`encoder_image_size` must be a positive multiple of the encoder's patch size."""
    _check_positive_size(image_size)
    if image_size % patch_size != 0:
        options = " or ".join(str(v) for v in _nearest_multiples(image_size, patch_size))
        raise ValueError(
            f"`encoder_image_size`={image_size} is not a multiple of the encoder's patch size {patch_size}; "
            f"use {options} (e.g. 224 gives a 16x16 token grid with patch 14)."
        )


# --------------------------------------------------------------------------- the module


def _patch_size_of(model: nn.Module) -> int:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise ValueError(
            f"`encoder`: {type(model).__name__} has no `patch_embed.patch_size`; use a timm ViT "
            "(e.g. encoder='dinov2_vits14' or 'vit_small_patch14_dinov2')."
        )
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if ph != pw:
        raise ValueError(f"`encoder`: non-square patches {ph}x{pw} are not supported; use a ViT with square patches.")
    return int(ph)


def _check_vit(model: nn.Module) -> None:
    """The wrapped model must look like a timm ViT with dynamic input size."""
    missing = [a for a in ("num_prefix_tokens", "forward_features") if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"`encoder`: {type(model).__name__} lacks {', '.join(missing)}; use a timm ViT "
            "(e.g. encoder='dinov2_vits14')."
        )
    if getattr(model, "dynamic_img_size", True) is False:
        raise ValueError(
            "`encoder`: the timm model was built without dynamic_img_size=True, so it only accepts its "
            "training resolution; build it with timm.create_model(..., dynamic_img_size=True) or use load_encoder()."
        )


RESIZE_RULE = "bicubic antialias to grid_for(H, W) * patch (aspect kept), clamp [0, 1], timm mean/std"
"""How FrozenEncoder.prepare resizes and normalises (recorded by the disk teacher cache)."""


class FrozenEncoder(nn.Module):
    """A frozen timm ViT that maps images in [0, 1] to its final normed patch tokens.

    Attributes: `embed_dim`, `patch_size`, `num_prefix_tokens` (CLS + registers,
    dropped from the output), `image_size` (the side of a square input; other
    aspects get about the same number of tokens), buffers `mean` and `std`
    (shape (3,), from the model's pretrained config). The module is always in
    eval mode and has no trainable parameters.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, image_size: int = 224) -> None:
        super().__init__()
        _check_vit(model)
        self.patch_size: int = _patch_size_of(model)
        _check_image_size(image_size, self.patch_size)
        self.model = model
        self.image_size: int = image_size
        self.embed_dim: int = int(getattr(model, "embed_dim", getattr(model, "num_features", 0)))
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)
        cfg = timm.data.resolve_data_config({}, model=model)
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32), persistent=False)  # (3,)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32), persistent=False)  # (3,)
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Ignore `mode`: a parent's `.train()` must not switch the teacher out of eval mode."""
        return super().train(False)

    @property
    def tokens_per_side(self) -> int:
        """Tokens along each side of a square input: image_size // patch_size."""
        return self.image_size // self.patch_size

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (gh, gw) for an image of this size: about tokens_per_side**2 tokens, aspect kept."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image height and width must be positive, got {height}x{width}.")
        n = self.tokens_per_side**2
        gh = max(1, round(math.sqrt(n * height / width)))
        gw = max(1, round(math.sqrt(n * width / height)))
        return gh, gw

    def input_size_for(self, height: int, width: int) -> tuple[int, int]:
        """Pixel size the encoder sees for an image of this size: the grid times the patch size."""
        gh, gw = self.grid_for(height, width)
        return gh * self.patch_size, gw * self.patch_size

    def prepare(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1], C in {1, 3} -> (B, 3, gh*p, gw*p), resized, clamped, normalised."""
        x = _to_rgb(images).to(device=self.mean.device, dtype=torch.float32)  # (B, 3, H, W)
        size = self.input_size_for(x.shape[-2], x.shape[-1])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; the encoder was trained on clamped (uint8) pixels
        return (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)  # (B, 3, gh*p, gw*p)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, gh*gw, embed_dim) patch tokens, row-major over (gh, gw)."""
        x = self.prepare(images)  # (B, 3, gh*p, gw*p)
        if x.shape[0] == 0:
            gh, gw = self.grid_for(images.shape[-2], images.shape[-1])
            return x.new_zeros(0, gh * gw, self.embed_dim)
        dtype = next(self.model.parameters()).dtype
        feats = self.model.forward_features(x.to(dtype))  # (B, prefix + gh*gw, D)
        return feats[:, self.num_prefix_tokens :].contiguous()  # (B, gh*gw, D)


def _to_rgb(images: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) -> (B, 3, H, W); anything else is an error."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"the encoder expects images of shape (B, 3, H, W) (or (B, 1, H, W)) in [0, 1], got "
            f"{tuple(images.shape)}; for video pass frames flattened into the batch."
        )
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    return images


# --------------------------------------------------------------------------- building


def _create(timm_name: str, alias: str, image_size: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm.create_model with the fixed encoder arguments; a non-ViT gives a ValueError naming `encoder`."""
    try:
        return timm.create_model(
            timm_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, img_size=image_size, **kwargs
        )
    except TypeError as e:
        raise ValueError(
            f"`encoder`={alias!r} (timm {timm_name!r}) could not be built as a ViT with dynamic image size "
            f"({e}); use a timm ViT, e.g. encoder='dinov2_vits14'."
        ) from e


def _meta_model(timm_name: str, alias: str, image_size: int) -> nn.Module:
    """The model on the meta device (no memory, no init): checks it is a ViT and `encoder_image_size` fits."""
    _check_positive_size(image_size)
    meta = _create(timm_name, alias, image_size, pretrained=False, device="meta")
    _check_vit(meta)
    _check_image_size(image_size, _patch_size_of(meta))
    return meta


def load_encoder(name: str, image_size: int = 224, checkpoint: str | os.PathLike[str] | None = None) -> FrozenEncoder:
    """Build the frozen teacher `name` (an alias of ENCODER_ALIASES or any timm ViT name).

    With `checkpoint`, weights are read from that local file (official DINOv2
    release format, timm format, .safetensors or .pth/.pt/.bin, optionally
    wrapped in a "model"/"state_dict"/"teacher" dict) and must match the model
    exactly. Without it, timm fetches the pretrained weights from the Hugging
    Face hub (or its local cache); if that is impossible a RuntimeError says to
    set `encoder_checkpoint`.
    """
    timm_name = resolve_encoder_name(name)
    path = checkpoint_path(checkpoint)
    meta = _meta_model(timm_name, name, image_size)
    if path is None:
        model = create_pretrained(lambda: _create(timm_name, name, image_size, pretrained=True), timm_name, name)
    else:
        state_dict = read_checkpoint(meta, path, name)
        model = load_into(meta, state_dict, path, name, lambda: _create(timm_name, name, image_size))
    return FrozenEncoder(model, image_size=image_size)
