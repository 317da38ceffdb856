"""Reading an encoder's weights from a local file (`encoder_checkpoint`). No Lightning.

Accepts the official DINOv2 release (`dinov2_vits14_pretrain.pth`), timm files (`.safetensors`),
DINOv2 training checkpoints (wrapped, prefixed, chunked blocks) and classification checkpoints
(the head is dropped, as timm does). Keys go through timm's own `checkpoint_filter_fn`; any key
left missing or unexpected is an error that lists them.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
from torch import Tensor, nn

_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("model", "state_dict", "teacher")  # unwrapped in this order, repeatedly
_MAX_LISTED_KEYS = 20


def checkpoint_path(checkpoint: str | os.PathLike[str] | None) -> Path | None:
    if checkpoint is None or (isinstance(checkpoint, str) and not checkpoint.strip()):
        return None
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"`encoder_checkpoint`={str(checkpoint)!r}: no such file. Point it at the encoder weights "
            f"(e.g. the official dinov2_vits14_pretrain.pth or a timm model.safetensors), or leave it unset "
            f"to download them from the Hugging Face hub."
        )
    if path.suffix.lower() not in _CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"`encoder_checkpoint`={str(path)!r}: unsupported file type {path.suffix!r}; "
            f"expected one of {', '.join(_CHECKPOINT_SUFFIXES)}."
        )
    return path


def _read_checkpoint_file(path: Path) -> Any:
    """The raw object in the file: safetensors directly, pickles with weights_only=True (never arbitrary code)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for pickles holding arbitrary objects, or a corrupt file
        raise ValueError(
            f"`encoder_checkpoint`={str(path)!r} could not be read with torch.load(weights_only=True): {e}. "
            "Re-save just the weights, e.g. torch.save(model.state_dict(), path) or as .safetensors."
        ) from e


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """Peel "model"/"state_dict"/"teacher" wrappers and drop non-tensor entries (epoch counters, ...)."""
    peeled: list[str] = []
    while isinstance(obj, Mapping):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
        peeled.append(key)
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"`encoder_checkpoint`={str(path)!r} holds a {type(obj).__name__}, not a state dict; "
            "save the weights with torch.save(model.state_dict(), path)."
        )
    state_dict = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state_dict:
        _raise_no_tensors(obj, peeled, path)
    return state_dict


def _raise_no_tensors(obj: Mapping, peeled: list[str], path: Path) -> NoReturn:
    """An empty file, an empty "state_dict", or only counters: say what is there and what is expected."""
    where = f" under {'/'.join(repr(k) for k in peeled)}" if peeled else ""
    if obj:
        found = f"a dict{where} with no tensors (keys {_list_keys(sorted(map(str, obj)))})"
    else:
        found = f"an empty dict{where}"
    raise ValueError(
        f"`encoder_checkpoint`={str(path)!r} holds no weights: found {found}; expected the encoder's "
        "state dict, parameter names mapped to tensors (e.g. 'blocks.0.attn.qkv.weight'). Re-save the "
        "weights with torch.save(model.state_dict(), path) or as .safetensors."
    )


def _strip_prefix(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keep the keys under `prefix` (without it) when any key has it; otherwise return the dict unchanged."""
    if not any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _flatten_block_chunks(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """DINOv2 training checkpoints with block_chunks > 0 name blocks 'blocks.<chunk>.<index>.'; drop the chunk."""
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.")
    if not any(chunked.match(k) for k in state_dict):
        return state_dict
    return {chunked.sub(r"blocks.\1.", k): v for k, v in state_dict.items()}


def _normalise_training_format(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """DDP ('module.'), torch.compile ('_orig_mod.') and DINOv2 teacher ('backbone.') prefixes, chunked blocks."""
    for prefix in ("module.", "_orig_mod.", "backbone."):
        state_dict = _strip_prefix(state_dict, prefix)
    return _flatten_block_chunks(state_dict)


def _timm_filter(model: nn.Module) -> Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]:
    """The checkpoint filter of the model's timm module (vision_transformer.checkpoint_filter_fn for ViTs).

    It converts the official DINOv2 release format (mask_token dropped,
    register_tokens -> reg_token, the CLS position folded into cls_token for
    register models, mlp.w12/w3 -> fc1/fc2) and resamples pos_embed to the
    model's grid.
    """
    import sys

    from timm.models import vision_transformer

    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None and isinstance(model, vision_transformer.VisionTransformer):
        fn = vision_transformer.checkpoint_filter_fn
    return fn if fn is not None else (lambda sd, _model: sd)


def _list_keys(keys: list[str]) -> str:
    if not keys:
        return "0 (none)"
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = f", ... (+{len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else ""
    return f"{len(keys)}: [{shown}{more}]"


def _check_shapes(model: nn.Module, state_dict: dict[str, Tensor], path: Path, alias: str) -> None:
    """Shape mismatches (another model size) as a ValueError instead of load_state_dict's RuntimeError."""
    own = model.state_dict()
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ValueError(
            f"`encoder_checkpoint`={str(path)!r} does not match `encoder`={alias!r}: "
            f"{len(bad)} tensors have other shapes ({'; '.join(bad[:_MAX_LISTED_KEYS])}). "
            "The file is probably for another model size; set `encoder` to the model the file was saved from."
        )


def _check_registers(model: nn.Module, state_dict: dict[str, Tensor], path: Path, alias: str) -> None:
    """A register checkpoint in a model without registers (or the reverse) breaks timm's pos_embed resampling."""
    file_has = "register_tokens" in state_dict or "reg_token" in state_dict
    model_has = getattr(model, "reg_token", None) is not None
    if file_has == model_has:
        return
    if file_has:
        fix = "the file has register tokens: use the '_reg' encoder (e.g. encoder='dinov2_vits14_reg')"
    else:
        fix = "the file has no register tokens: use the encoder without '_reg' (e.g. encoder='dinov2_vits14')"
    raise ValueError(f"`encoder_checkpoint`={str(path)!r} does not fit `encoder`={alias!r}: {fix}.")


def read_checkpoint(model: nn.Module, path: Path, alias: str) -> dict[str, Tensor]:
    """Read, unwrap and convert the file with timm's filter into the model's key names and shapes."""
    state_dict = _unwrap_state_dict(_read_checkpoint_file(path), path)
    state_dict = _normalise_training_format(state_dict)
    _check_registers(model, state_dict, path, alias)
    try:
        state_dict = _timm_filter(model)(state_dict, model)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(
            f"`encoder_checkpoint`={str(path)!r} could not be converted for `encoder`={alias!r} by timm's "
            f"checkpoint filter ({type(e).__name__}: {e}); check that the file is the checkpoint of this model."
        ) from e
    state_dict = _drop_classifier(model, state_dict)
    _check_shapes(model, state_dict, path, alias)
    return state_dict


def _drop_classifier(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder is built headless (num_classes=0): drop the classifier head of a classification
    checkpoint, as timm does; every other unknown key still counts as unexpected."""
    own = model.state_dict()
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return {k: v for k, v in state_dict.items() if k in own or not any(k == h or k.startswith(h + ".") for h in heads)}


def load_into(
    meta: nn.Module, state_dict: dict[str, Tensor], path: Path, alias: str, build: Callable[[], nn.Module]
) -> nn.Module:
    """Load into the meta-device model by assignment (no random init of weights about to be overwritten).

    Any missing or unexpected key is an error. Should the model hold state
    that no checkpoint carries (non-persistent buffers), it is built for real
    with `build` and loaded by copy instead.
    """
    own = meta.state_dict()
    state_dict = {  # the model's dtype, not the file's (fp16/bf16 releases)
        k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state_dict.items()
    }
    result = meta.load_state_dict(state_dict, strict=False, assign=True)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"`encoder_checkpoint`={str(path)!r} does not fit `encoder`={alias!r}: "
            f"missing keys {_list_keys(missing)}; unexpected keys {_list_keys(unexpected)}. "
            "Use the checkpoint of this exact model (official DINOv2 .pth or timm .safetensors), "
            "or change `encoder` to match the file."
        )
    if not any(t.is_meta for t in itertools.chain(meta.parameters(), meta.buffers())):
        return meta
    model = build()
    model.load_state_dict(state_dict, strict=True)
    return model
