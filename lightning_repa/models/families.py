"""Model families as data (SPEC sections 3 and 9): which blocks exist, in which order, what
each returns, where the image tokens sit, and the token grid. No Lightning.

A family is a declarative entry; the capture code never branches on a family name. Each
entry was checked against the real diffusers class (tests/test_families.py).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_repa.choices import Method
from lightning_repa.models.selectors import (
    SELECTORS,
    TokenSelector,
    _after_caption,
    _after_text,
    _all,
    _first,
    _last,
    _no_fractal,
    _z_image_layers,
)

Grid = tuple[int, int]
Grid3 = tuple[int, int, int]
@dataclass(frozen=True)
class BlockList:
    """Blocks at one attribute of the denoiser and how to read the image stream from their outputs.

    The attribute holds an `nn.ModuleList` (DiT blocks) or one module (a UNet's `mid_block`).
    """

    attr: str
    output: Optional[int] = None  # tuple element holding the image stream; None: a tensor
    select: TokenSelector = _all  # where the image tokens sit in that stream
    feature_map: bool = False  # the stream is (B, C, H, W), flattened row-major to (B, H*W, C)

    def stream(self, output: Any) -> Tensor:
        """The image stream of one block output, as tokens (B, L, D)."""
        x = output if self.output is None else self._element(output)
        if not isinstance(x, Tensor):
            what = f"a tuple of {len(x)}" if isinstance(x, (tuple, list)) else type(x).__name__
            raise ValueError(f"block list `{self.attr}` returns {what}, not a tensor: set `output` to the element "
                             f"that holds the image stream (0..{len(x) - 1 if isinstance(x, (tuple, list)) else 0})")
        return x.flatten(2).transpose(1, 2) if self.feature_map else x  # (B, H*W, C) from (B, C, H, W)

    def _element(self, output: Any) -> Any:
        n = len(output) if isinstance(output, (tuple, list)) else None
        if n is None or not -n <= self.output < n:
            what = f"a tuple of {n}" if n is not None else f"a {type(output).__name__}"
            choices = f"; use {' or '.join(map(str, range(n)))}" if n else "; remove `output`"
            raise ValueError(f"block list `{self.attr}` has output={self.output}, but its blocks return {what}{choices}")
        if output[self.output] is None:
            raise ValueError(f"element {self.output} of the output of `{self.attr}` is None (a stream this block does "
                             "not return): set `output` to the image stream's element")
        return output[self.output]

    def modules(self, model: nn.Module, family: str) -> list[nn.Module]:
        found: Any = model
        for part in self.attr.split("."):  # a dotted path: "mode_blocks.image" (a ModuleList in a ModuleDict)
            found = getattr(found, part, None)
        if isinstance(found, nn.ModuleList):
            return list(found)
        if isinstance(found, nn.Module) and not isinstance(found, nn.ModuleDict):
            return [found]
        if found is None and hasattr(model, self.attr):
            raise ValueError(
                f"family={family!r}: `{self.attr}` of {type(model).__name__} is None, so there is no block to align; "
                f"use a {type(model).__name__} config that has `{self.attr}`"
            )
        lists = [f"{name} ({len(m)})" for name, m in model.named_children() if isinstance(m, nn.ModuleList)]
        raise ValueError(
            f"family={family!r}: {type(model).__name__} has no block list `{self.attr}`; its block lists are: "
            f"{', '.join(lists) or 'none'}"
        )


def _transformer_width(model: nn.Module) -> int:
    """Width of the residual stream of a transformer's blocks."""
    config = getattr(model, "config", None)
    for key in ("hidden_size", "model_dim"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    inner = getattr(model, "inner_dim", None)
    if inner:
        return int(inner)
    return int(config.num_attention_heads * config.attention_head_dim)


def _patch_stride(model: nn.Module) -> Grid:
    """Latent positions per token side of a DiT: its patch size (the pipeline's packing is the family's)."""
    patch = getattr(model.config, "patch_size", 1) or 1
    if isinstance(patch, (tuple, list)):
        patch = patch[-2:] if len(patch) >= 2 else (patch[0], patch[0])
        return int(patch[0]), int(patch[1])
    return int(patch), int(patch)


def _video_stride(model: nn.Module) -> Grid3:
    """Latent positions per token of a video DiT: (t, h, w), from `patch_size` (t, h, w) (Wan,
    SanaVideo, Kandinsky 5) or `patch_size_t` and `patch_size` (LTX-Video)."""
    patch = model.config.patch_size
    if isinstance(patch, (tuple, list)) and len(patch) == 3:
        return int(patch[0]), int(patch[1]), int(patch[2])
    return int(getattr(model.config, "patch_size_t", 1) or 1), int(patch), int(patch)


def _config_dim(model: nn.Module) -> int:
    """Z-Image's width is `config.dim`."""
    return int(model.config.dim)


def _z_image_stride(model: nn.Module) -> Grid:
    """Z-Image patchifies with `patch_size` from `config.all_patch_size` (2 by default)."""
    sizes = tuple(model.config.all_patch_size)
    if len(sizes) != 1:
        raise ValueError(f"z_image: the model has several patch sizes {sizes}; the token grid depends on the call")
    return int(sizes[0]), int(sizes[0])


def _unet_width(model: nn.Module) -> int:
    """Channels of a UNet's mid block: those of its deepest down block."""
    return int(model.config.block_out_channels[-1])


def _unet_stride(model: nn.Module) -> Grid:
    """Latent positions per mid-block position: 2 ** (the down blocks that downsample)."""
    downsamples = sum(getattr(block, "downsamplers", None) is not None for block in model.down_blocks)
    return 2**downsamples, 2**downsamples


@dataclass(frozen=True)
class Family:
    name: str
    method: Method
    classes: tuple[str, ...]  # diffusers class names (or base names) of the denoiser
    blocks: tuple[BlockList, ...]  # in forward order
    default_block_index: int
    pack: int = 1  # spatial packing done by the pipeline before the transformer (flux: 2x2)
    latent_format: str = "kl"  # how to undo the training-space transform (decoders.LATENT_FORMATS)
    width: Callable[[nn.Module], int] = _transformer_width  # channels of the captured stream
    stride: Callable[[nn.Module], tuple[int, ...]] = _patch_stride  # latent positions per token: (h, w) or (t, h, w)
    video: bool = False  # latents (B, C, T, h, w); tokens per frame
    temporal_compression: int = 1  # video: pixel frames per latent frame of the family's VAE (when none is attached)

    # --- structure ---------------------------------------------------------
    def check_class(self, model: nn.Module) -> None:
        names = {cls.__name__ for cls in type(model).__mro__}
        if not names & set(self.classes):
            owners = [f.name for f in FAMILIES.values() if names & set(f.classes)]
            hint = f"; it belongs to family {' or '.join(map(repr, owners))}: set family={'|'.join(owners)}" if owners else ""
            raise ValueError(
                f"family={self.name!r} expects a denoiser of class {' or '.join(self.classes)}, "
                f"got {type(model).__name__}{hint}"
            )

    def block_modules(self, model: nn.Module) -> list[tuple[BlockList, nn.Module]]:
        """All blocks in forward order, each with the list it came from."""
        return [(spec, block) for spec in self.blocks for block in spec.modules(model, self.name)]

    def hidden_size(self, model: nn.Module) -> int:
        """Width of the captured stream (the projector's input)."""
        return self.width(model)

    # --- geometry ----------------------------------------------------------
    def patch_hw(self, model: nn.Module) -> Grid:
        """Latent positions per token side: the model's patch size or downsampling, times the packing."""
        sh, sw = self.stride(model)[-2:]
        return sh * self.pack, sw * self.pack

    def grid(self, latent_shape: torch.Size | tuple[int, ...], model: nn.Module) -> Grid | Grid3:
        """Token grid of the image stream: (h', w') for latents (B, C, h, w), or (T', h', w') for a
        video family's latents (B, C, T, h, w)."""
        dims = 5 if self.video else 4
        if len(latent_shape) != dims:
            layout = "(B, C, T, h, w)" if self.video else "(B, C, h, w)"
            raise ValueError(
                f"family={self.name!r} expects spatial latents {layout} in the batch, got shape "
                f"{tuple(latent_shape)}; cache unpacked latents (pack them in training_step)"
            )
        strides = (*self.stride(model)[:-2], *self.patch_hw(model)) if self.video else self.patch_hw(model)
        sizes = tuple(latent_shape[2:])
        if any(size % stride for size, stride in zip(sizes, strides)):
            what = "downsampling" if self.stride is _unet_stride else "patch/packing size"
            raise ValueError(
                f"family={self.name!r}: latents of size {'x'.join(map(str, sizes))} are not divisible by "
                f"{'x'.join(map(str, strides))}, the {what} of {type(model).__name__}"
            )
        return tuple(size // stride for size, stride in zip(sizes, strides))


def call_arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of one `module(*args, **kwargs)` call by name."""
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"the {type(module).__name__} was called with arguments its forward does not take ({error}): the aligned "
            "call's arguments (read by `align_call` predicates and the token selectors) would be incomplete"
        ) from None
    return dict(bound.arguments)


_DIT = Method.repa
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # The image stream of flux-like models may carry reference-image tokens after the
        # N noisy ones (Kontext / FLUX.2 editing): take the first N, never the last.
        Family("flux", _DIT, ("FluxTransformer2DModel",),
               (BlockList("transformer_blocks", 1, _first), BlockList("single_transformer_blocks", 1, _first)), 8,
               pack=2),
        Family("chroma", _DIT, ("ChromaTransformer2DModel",),
               (BlockList("transformer_blocks", 1, _first), BlockList("single_transformer_blocks", None, _after_text)),
               8, pack=2),
        Family("flux2", _DIT, ("Flux2Transformer2DModel",),
               (BlockList("transformer_blocks", 1, _first), BlockList("single_transformer_blocks", None, _after_text)),
               8, latent_format="flux2"),
        Family("sd3", _DIT, ("SD3Transformer2DModel",), (BlockList("transformer_blocks", 1),), 8),
        Family("auraflow", _DIT, ("AuraFlowTransformer2DModel",),
               (BlockList("joint_transformer_blocks", 1), BlockList("single_transformer_blocks", None, _last)), 8),
        Family("hidream", _DIT, ("HiDreamImageTransformer2DModel",),
               (BlockList("double_stream_blocks", 0, _first), BlockList("single_stream_blocks", None, _first)), 8),
        Family("lumina2", _DIT, ("Lumina2Transformer2DModel",), (BlockList("layers", None, _after_caption),), 8),
        Family("sana", _DIT, ("SanaTransformer2DModel",), (BlockList("transformer_blocks"),), 10),
        Family("pixart", _DIT, ("PixArtTransformer2DModel",), (BlockList("transformer_blocks"),), 10),
        # The REPA paper's own DiT (square latents only: its output step reshapes as a square).
        Family("dit", _DIT, ("DiTTransformer2DModel",), (BlockList("transformer_blocks"),), 7),
        # FLUX.3: text-only mode blocks run apart; the image mode blocks, then the single blocks'
        # content stream [N image, reference tokens].
        Family("flux3", _DIT, ("Flux3Transformer2DModel",),
               (BlockList("mode_blocks.image"), BlockList("single_transformer_blocks", 1, _first)), 8,
               latent_format="flux2"),
        # Qwen-Image: (text, image) blocks; edit pipelines append reference tokens after the image.
        Family("qwenimage", _DIT, ("QwenImageTransformer2DModel",), (BlockList("transformer_blocks", 1, _first),), 8,
               latent_format="qwenimage"),
        Family("z_image", _DIT, ("ZImageTransformer2DModel",), (BlockList("layers", None, _z_image_layers),), 8,
               width=_config_dim, stride=_z_image_stride),
        # U-REPA: the UNet's mid block, (B, C, H, W) at latent / 2**downsamples (SDXL 128 -> 32, SD 1.5 64 -> 8).
        *(Family(name, Method.urepa, ("UNet2DConditionModel",), (BlockList("mid_block", feature_map=True),), 0,
                 width=_unet_width, stride=_unet_stride) for name in ("sdxl", "sd15", "kolors")),
        # CREPA: video DiTs, image tokens only in every block, (T', H', W') row-major (per frame).
        Family("wan", Method.crepa, ("WanTransformer3DModel",), (BlockList("blocks"),), 8, stride=_video_stride,
               video=True, temporal_compression=4),
        Family("ltxvideo", Method.crepa, ("LTXVideoTransformer3DModel",), (BlockList("transformer_blocks"),), 8,
               stride=_video_stride, video=True, temporal_compression=8),
        Family("sanavideo", Method.crepa, ("SanaVideoTransformer3DModel",), (BlockList("transformer_blocks"),), 10,
               stride=_video_stride, video=True, temporal_compression=4),
        Family("kandinsky5_video", Method.crepa, ("Kandinsky5Transformer3DModel",),
               (BlockList("visual_transformer_blocks", select=_no_fractal),), 8, stride=_video_stride, video=True,
               temporal_compression=4),
        Family("hunyuan_video15", Method.crepa, ("HunyuanVideo15Transformer3DModel",),
               (BlockList("transformer_blocks", 0),), 8, stride=_video_stride, video=True, temporal_compression=4),
        # LTX-2: (video, audio) blocks; the video stream holds N noisy tokens, then IC-LoRA/keyframe tokens.
        Family("ltx2", Method.crepa, ("LTX2VideoTransformer3DModel",),
               (BlockList("transformer_blocks", 0, _first),), 8, stride=_video_stride, video=True,
               temporal_compression=8),
    )
}


WIDTHS: dict[str, Callable[[nn.Module], int]] = {"transformer": _transformer_width, "unet": _unet_width,
                                                 "config_dim": _config_dim}
"""How the captured stream's width is read from the model, by name (`width:`)."""
STRIDES: dict[str, Callable[[nn.Module], tuple[int, ...]]] = {
    "patch": _patch_stride, "unet": _unet_stride, "video": _video_stride, "z_image": _z_image_stride}
"""How latent positions per token are read from the model, by name (`stride:`)."""

_SPEC_KEYS = {"name", "method", "classes", "blocks", "default_block_index", "pack", "latent_format", "width",
              "stride", "video", "temporal_compression"}
_BLOCK_KEYS = {"attr", "output", "select", "feature_map"}


def _named(table: dict[str, Any], value: Any, what: str) -> Any:
    if callable(value):
        return value
    if value not in table:
        close = difflib.get_close_matches(str(value), list(table), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"family: unknown {what} {value!r}{hint} (known: {', '.join(table)})")
    return table[value]


def family_from_dict(spec: Mapping[str, Any]) -> Family:
    """A family declared as data (a dict, or a Hydra `family:` node), e.g. CogView4::

        family_from_dict({"name": "cogview4", "classes": ["CogView4Transformer2DModel"],
                          "blocks": [{"attr": "transformer_blocks", "output": 0}], "default_block_index": 8})

    Keys: `name`, `classes` (class names of the denoiser), `blocks` (in forward order, each
    `attr` (a ModuleList or one module of the denoiser), `output` (tuple element of the image
    stream, or null for a tensor), `select` (where the image tokens sit: a name of `SELECTORS`,
    default "all"), `feature_map` (a (B, C, H, W) output)), `default_block_index`; optional
    `method` (repa), `pack` (spatial packing by the pipeline, 1), `latent_format` ("kl"),
    `width` ("transformer" or "unet"), `stride` ("patch", "unet" or "video"), `video` (False),
    `temporal_compression` (video: pixel frames per latent frame of its VAE, 1).
    """
    unknown = set(spec) - _SPEC_KEYS
    missing = {"name", "classes", "blocks", "default_block_index"} - set(spec)
    if unknown or missing:
        raise ValueError(
            f"family: {'unknown keys ' + str(sorted(unknown)) if unknown else ''}"
            f"{'; ' if unknown and missing else ''}{'missing keys ' + str(sorted(missing)) if missing else ''} "
            f"(keys: {', '.join(sorted(_SPEC_KEYS))})"
        )
    if isinstance(spec["blocks"], (str, Mapping)) or not isinstance(spec["blocks"], Sequence):
        raise ValueError(f"family {spec['name']!r}: `blocks` must be a list of block lists in forward order, e.g. "
                         f"[{{'attr': 'transformer_blocks', 'output': 1}}], got {spec['blocks']!r}")
    blocks = []
    for block in spec["blocks"]:
        block = {"attr": block} if isinstance(block, str) else dict(block)
        if set(block) - _BLOCK_KEYS or "attr" not in block:
            raise ValueError(f"family {spec['name']!r}: a block list needs `attr` and may have "
                             f"{', '.join(sorted(_BLOCK_KEYS - {'attr'}))}; got {block}")
        select = _named(SELECTORS, block.get("select", "all"), "selector (`select`)")
        blocks.append(BlockList(block["attr"], block.get("output"), select, bool(block.get("feature_map", False))))
    classes = spec["classes"]
    return Family(
        str(spec["name"]), Method.parse(spec.get("method", "repa"), "family.method"),
        (classes,) if isinstance(classes, str) else tuple(classes), tuple(blocks), int(spec["default_block_index"]),
        pack=int(spec.get("pack", 1)), latent_format=str(spec.get("latent_format", "kl")),
        width=_named(WIDTHS, spec.get("width", "transformer"), "width"),
        stride=_named(STRIDES, spec.get("stride", "video" if spec.get("video") else "patch"), "stride"),
        video=bool(spec.get("video", False)), temporal_compression=int(spec.get("temporal_compression", 1)),
    )


def get_family(family: str | Family | Mapping[str, Any]) -> Family:
    """A shipped family by name, a declared `Family`, or one declared as a dict (`family_from_dict`)."""
    if isinstance(family, Family):
        return family
    if isinstance(family, Mapping):
        return family_from_dict(family)
    if family not in FAMILIES:
        close = difflib.get_close_matches(str(family), list(FAMILIES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown `family` {family!r}{hint} (known: {', '.join(FAMILIES)}; or declare one: a Family or a dict, "
            "see `family_from_dict`)"
        )
    return FAMILIES[family]
