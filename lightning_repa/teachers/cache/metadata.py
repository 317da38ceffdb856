"""What a disk cache records about how its features were made, and checks on open. No Lightning."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from lightning_repa.choices import Decoder
from lightning_repa.config import RepaConfig

FORMAT_VERSION = 2
"""Layout of a disk cache; part of its metadata (2: eight-projection fingerprints, entry checksums,
every decoding input recorded)."""

DECODE_BUFFERS = ("latents_mean", "latents_std", "bn.running_mean", "bn.running_var")
"""Registered buffers that de-normalise latents (LTX-Video, LTX-2; FLUX.2's BatchNorm statistics)."""


def cache_metadata(cfg: RepaConfig, teacher: Any) -> dict[str, Any]:
    """How the teacher makes its features, as a disk cache records and checks it."""
    from lightning_repa import __version__
    from lightning_repa.teachers.encoders import RESIZE_RULE  # imports timm

    decoder = teacher.decoder
    source: dict[str, Any] = {"decoder": "pixels" if decoder is None else decoder.kind.value,
                              "pixels_range": list(teacher.pixels_range),
                              "frames_per_latent": teacher.frames_per_latent}
    if decoder is not None:
        model = decoder.tae if decoder.kind is Decoder.tae else decoder.vae
        source.update({"latent_format": decoder.latent_format, "decoder_weights": describe_weights(model),
                       **decoding_inputs("decoder", model)})
        if decoder.kind is Decoder.tae and decoder.vae is not None:  # its statistics undo the latent normalisation
            source.update(decoding_inputs("vae", decoder.vae))
        if cfg.tae_checkpoint:
            source["tae_checkpoint_sha256"] = file_sha256(cfg.tae_checkpoint)
    return {
        "format": FORMAT_VERSION,
        "package_version": __version__,
        "encoder": cfg.encoder,
        "encoder_checkpoint_sha256": file_sha256(cfg.encoder_checkpoint) if cfg.encoder_checkpoint else "pretrained",
        "encoder_image_size": cfg.encoder_image_size,
        "embed_dim": teacher.embed_dim,
        "resize": RESIZE_RULE,
        "dtype": "float16",
        **source,
    }


def decoding_inputs(prefix: str, model: nn.Module) -> dict[str, Any]:
    """What a model's decoding reads besides its weights, one metadata field each: every public value
    of its diffusers config (`<prefix>_config.<name>`: scaling and shift factors, per-channel
    `latents_mean`/`latents_std`, `force_upcast`, ...) and the buffers that de-normalise latents
    (`<prefix>_buffers.<name>`, to 6 significant digits)."""
    config = getattr(model, "config", None) or {}
    out = {f"{prefix}_config.{k}": _jsonable(v) for k, v in sorted(config.items()) if not k.startswith("_")}
    buffers = dict(model.named_buffers())
    for name in DECODE_BUFFERS:
        if name in buffers:
            out[f"{prefix}_buffers.{name}"] = [float(f"{x:.6g}") for x in buffers[name].flatten().tolist()]
    return out


def _jsonable(value: Any) -> Any:
    """A config value as JSON gives it back (tuples become lists), so that a fresh value equals a read one."""
    return json.loads(json.dumps(value, default=str))


def describe_weights(model: nn.Module) -> str:
    """Class, parameter count and a float64 checksum of the weights (6 significant digits, so the
    same weights agree across devices)."""
    tensors = list(model.state_dict().values())
    total = sum(float(t.double().sum()) for t in tensors if t.is_floating_point())
    return f"{type(model).__name__}, {sum(t.numel() for t in tensors)} values, sum {total:.6e}"


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (or of a directory's files, in name order); remembered per size and mtime."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        key = (str(f.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _SHA256:
            h = hashlib.sha256()
            with open(f, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 22), b""):
                    h.update(chunk)
            _SHA256[key] = h.hexdigest()
        digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        digest.update(_SHA256[key].encode())
    return digest.hexdigest()
