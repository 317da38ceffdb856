"""A tiny timm ViT pretrained on the digits: the demo's REPA teacher.

Importing this module (done by ``import lightning_repa.demo``) registers ``TEACHER_NAME`` with
timm, so the package's encoder loader treats it like any timm ViT::

    model = timm.create_model(TEACHER_NAME, pretrained=False, num_classes=0,
                              dynamic_img_size=True, img_size=16)
    sd = safetensors.torch.load_file(teacher_checkpoint_path())
    sd = timm.models.vision_transformer.checkpoint_filter_fn(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # missing == [], unexpected == ["head.weight", "head.bias"] (the shipped file keeps the
    # 10-way classifier head, so the held-out accuracy can be re-measured)

``timm.create_model(TEACHER_NAME, pretrained=True)`` also loads the shipped file (its pretrained
cfg points at it). ``forward_features`` returns (B, 1 + 64, D) final-normed tokens on 16×16
inputs: the CLS token, then the 8×8 patch tokens in row-major order.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = [
    "TEACHER_NAME",
    "TEACHER_MEAN",
    "TEACHER_STD",
    "load_teacher_classifier",
    "normalize_for_teacher",
    "register_teacher",
    "teacher_checkpoint_path",
]

TEACHER_NAME = "vit_tiny_digits_patch2"
TEACHER_FILE = "vit_tiny_digits.safetensors"

# Mean and std of the 16×16 digits in [0, 1] (train split, seed 0: 0.3052 and 0.3189; the
# whole set agrees to 1e-4). Gray images are repeated to 3 channels, so the channels are equal.
TEACHER_MEAN = (0.3052, 0.3052, 0.3052)
TEACHER_STD = (0.3189, 0.3189, 0.3189)

# Architecture: patch 2 on 16×16 → 8×8 tokens (the demo DiT's grid too); average-pooled patch
# tokens feed the head (so the patch tokens themselves carry the class), final LayerNorm kept
# (fc_norm off) so forward_features returns normed tokens, as DINOv2's do.
TEACHER_ARGS = dict(
    img_size=16,
    patch_size=2,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=4.0,
    class_token=True,
    global_pool="avg",
    fc_norm=False,
    final_norm=True,
)


def teacher_checkpoint_path() -> Path:
    """The shipped weights (safetensors, float32, with the classifier head)."""
    return Path(__file__).resolve().parent / "weights" / TEACHER_FILE


default_cfgs = generate_default_cfgs(
    {
        TEACHER_NAME: dict(
            file=str(teacher_checkpoint_path()),
            num_classes=10,
            input_size=(3, 16, 16),
            pool_size=None,
            crop_pct=1.0,
            interpolation="bilinear",
            fixed_input_size=False,
            mean=TEACHER_MEAN,
            std=TEACHER_STD,
            first_conv="patch_embed.proj",
            classifier="head",
            license="bsd-3-clause",
        )
    }
)


def vit_tiny_digits_patch2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT (64 wide, 4 blocks, 4 heads, patch 2) trained on scikit-learn's digits at 16×16."""
    kwargs = {**TEACHER_ARGS, **kwargs}
    return build_model_with_cfg(
        VisionTransformer,
        TEACHER_NAME,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=TEACHER_ARGS["depth"] - 1, feature_cls="getter"),
        **kwargs,
    )


def normalize_for_teacher(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1 or 3, 16, 16) in [0, 1] → the teacher's normalised 3-channel input."""
    pixels = pixels.expand(-1, 3, -1, -1)
    mean = torch.tensor(TEACHER_MEAN, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(TEACHER_STD, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def load_teacher_classifier() -> VisionTransformer:
    """The shipped teacher with its 10-way head, in eval mode: e.g. to score generated digits.

    Inputs are (B, 3, 16, 16) images through ``normalize_for_teacher``.
    """
    from safetensors.torch import load_file

    model = timm.create_model(TEACHER_NAME, pretrained=False, num_classes=10)
    model.load_state_dict(load_file(str(teacher_checkpoint_path())), strict=True)
    return model.eval().requires_grad_(False)


def register_teacher() -> str:
    """Register ``TEACHER_NAME`` with timm once (re-registering is a no-op); returns the name."""
    if timm.is_model(TEACHER_NAME):
        owner = getattr(timm.models.model_entrypoint(TEACHER_NAME), "__module__", None)
        if owner != __name__:
            raise RuntimeError(f"timm already has a model named {TEACHER_NAME!r}, registered by {owner}")
    else:
        register_model(vit_tiny_digits_patch2)
    return TEACHER_NAME


register_teacher()
