"""What a disk cache records about how its features were made, and checks on open. No Lightning."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from lightning_repa.choices import Decoder
from lightning_repa.config import RepaConfig

FORMAT_VERSION = 1
"""Layout of a disk cache; part of its metadata."""


def cache_metadata(cfg: RepaConfig, teacher: Any) -> dict[str, Any]:
    """How the teacher makes its features, as a disk cache records and checks it."""
    from lightning_repa import __version__
    from lightning_repa.teachers.encoders import RESIZE_RULE  # imports timm

    decoder = teacher.decoder
    if decoder is None:
        source = {"decoder": "pixels", "pixels_range": list(teacher.pixels_range)}
    else:
        model = decoder.tae if decoder.kind is Decoder.tae else decoder.vae
        source = {"decoder": decoder.kind.value, "latent_format": decoder.latent_format,
                  "decoder_weights": describe_weights(model)}
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
