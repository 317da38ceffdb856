"""Where the image tokens sit in a block's stream (SPEC section 3): one function per layout, by
name in `SELECTORS`. Each takes (the block's stream (B, L, D), the number N of image tokens from
the latent grid, the denoiser call's arguments by name) and returns the image tokens (B, N, D).
No Lightning."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

# (block output, number of image tokens, the denoiser call's arguments) -> (B, N, D)
TokenSelector = Callable[[Tensor, int, dict[str, Any]], Tensor]


def _all(x: Tensor, n: int, call: dict[str, Any]) -> Tensor:
    return x


def _first(x: Tensor, n: int, call: dict[str, Any]) -> Tensor:
    return x[:, :n]  # image tokens first, then text (and padding)


def _last(x: Tensor, n: int, call: dict[str, Any]) -> Tensor:
    return x[:, -n:]  # text (and register) tokens first, image tokens last


def _after_text(x: Tensor, n: int, call: dict[str, Any]) -> Tensor:
    """[text L, image N, reference-image tokens (edit pipelines append them)...]."""
    text = call.get("encoder_hidden_states")
    if text is None:
        raise ValueError("the denoiser was called without `encoder_hidden_states`; the image offset is unknown")
    return x[:, text.shape[1] : text.shape[1] + n]


def _after_caption(x: Tensor, n: int, call: dict[str, Any]) -> Tensor:
    """Lumina2's joint blocks: per sample [caption (mask.sum()), image, padding]."""
    mask = call.get("encoder_attention_mask")
    if mask is None:
        raise ValueError("lumina2: the denoiser was called without `encoder_attention_mask`; the image offset is unknown")
    offsets = mask.bool().sum(dim=1).tolist()  # caption length per sample
    return torch.stack([x[b, o : o + n] for b, o in enumerate(offsets)])  # (B, N, D)



def _no_fractal(x: Tensor, n: int, call: dict[str, Any]) -> Tensor:
    """Kandinsky 5's visual tokens in (T, H, W) order; its sparse ("nabla") attention reorders them
    in 8x8 tiles (`sparse_params["to_fractal"]`), which CREPA refuses rather than misreads."""
    sparse = call.get("sparse_params") or {}
    if sparse.get("to_fractal"):
        raise ValueError(
            "kandinsky5_video: the denoiser was called with sparse_params['to_fractal'] (nabla attention), which "
            "orders the visual tokens in 8x8 tiles; CREPA needs the (T, H, W) order: train with the regular "
            "attention (sparse_params=None)"
        )
    return x


Z_IMAGE_SEQ_MULTIPLE = 32  # diffusers transformer_z_image.SEQ_MULTI_OF: every segment is padded to a multiple


def _z_image_padded(n: int) -> int:
    return n + (-n) % Z_IMAGE_SEQ_MULTIPLE


def _z_image_target_offsets(call: dict[str, Any], captions: bool) -> Optional[list[int]]:
    """Per-sample offset of the noisy image in Z-Image's streams; None in the basic mode (image first).

    Omni mode (`x` a list of per-sample image lists, the noisy target last; ZImageOmniPipeline) lays a
    sample out as [caption_1, ..., caption_k, image_1, ..., image_k (target last), siglip...] in the main
    layers and [image_1, ..., image_k] in the noise refiner, each segment padded to a multiple of 32
    (`patchify_and_embed_omni`, `_build_unified_sequence`); a missing image (None) is 32 pad tokens.
    """
    x = call.get("x")
    if x is None:
        raise ValueError("z_image: the denoiser was called without `x`; the image offset is unknown")
    if not isinstance(x[0], (list, tuple)):
        return None  # basic mode: [image, image padding, caption, caption padding]
    p, pf = call.get("patch_size", 2), call.get("f_patch_size", 1)
    offsets = []
    for i, images in enumerate(x):
        offset = sum(Z_IMAGE_SEQ_MULTIPLE if im is None else _z_image_padded(
            (im.shape[1] // pf) * (im.shape[2] // p) * (im.shape[3] // p)) for im in images[:-1])
        if captions:
            offset += sum(_z_image_padded(len(c)) for c in call["cap_feats"][i])
        offsets.append(offset)
    return offsets


def _z_image_layers(x: Tensor, n: int, call: dict[str, Any]) -> Tensor:
    """Z-Image's main layers: [image, padding, caption] (basic), or per sample after the captions and
    the condition images (omni)."""
    offsets = _z_image_target_offsets(call, captions=True)
    if offsets is None:
        return x[:, :n]
    return torch.stack([x[b, o: o + n] for b, o in enumerate(offsets)])  # (B, N, D)


def _z_image_refiner(x: Tensor, n: int, call: dict[str, Any]) -> Tensor:
    """Z-Image's noise refiner (image stream only): [image, padding], or after the condition images (omni)."""
    offsets = _z_image_target_offsets(call, captions=False)
    if offsets is None:
        return x[:, :n]
    return torch.stack([x[b, o: o + n] for b, o in enumerate(offsets)])



SELECTORS: dict[str, TokenSelector] = {
    "all": _all, "first": _first, "last": _last, "after_text": _after_text, "after_caption": _after_caption,
    "no_fractal": _no_fractal, "z_image_layers": _z_image_layers, "z_image_refiner": _z_image_refiner,
}
"""Selectors by the name a declared family uses (`select:`)."""
