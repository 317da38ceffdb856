"""Cache keys and sample fingerprints of the teacher-feature cache. No Lightning.

A key is the sample's stable id (`batch[ids_key]`), with `@view` when views are keyed
(`views_key`). A fingerprint is two fixed random projections of what the teacher saw (the clean
latents, or the pixels with decoder=pixels): a sample that comes back different under its key (a
random crop or flip) moves them by about its RMS, the rounding of another dtype by far less.
"""

from __future__ import annotations

import functools
from typing import Any, Hashable, Mapping, Optional

import torch
from torch import Tensor


def sample_ids(batch: Mapping[str, Any], key: str, size: int, distinct: bool = True) -> list[Hashable]:
    """The batch's sample ids as hashable Python values (`distinct`: one per sample); errors name `ids_key`."""
    if key not in batch:
        raise KeyError(
            f"the teacher cache reads stable sample ids from batch[{key!r}], which is missing (keys: {sorted(batch)}); "
            "return them from your dataset or set `ids_key` (or use cache=none)"
        )
    ids = batch[key]
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if len(ids) != size or (distinct and len(set(map(str, ids))) != size):
        raise ValueError(f"batch[{key!r}] must hold one distinct id per sample ({size}), got {ids}")
    return ids


def cache_keys(batch: Mapping[str, Any], ids_key: str, views_key: Optional[str], size: int) -> list[str]:
    """One string key per sample: its id, and `@view` when views are keyed."""
    ids = sample_ids(batch, ids_key, size, distinct=views_key is None)
    if views_key is None:
        return [str(i) for i in ids]
    if views_key not in batch:
        raise KeyError(f"`views_key`={views_key!r} is not a key of the batch (keys: {sorted(batch)})")
    views = batch[views_key]
    views = views.tolist() if isinstance(views, Tensor) else list(views)
    keys = [f"{i}@{v}" for i, v in zip(ids, views)]
    if len(views) != size or len(set(keys)) != size:
        raise ValueError(f"batch[{views_key!r}] must hold one view id per sample ({size}), distinct for samples of "
                         f"one id, got {views}")
    return keys


FINGERPRINT_SIZE = 8
"""Random projections per fingerprint: a flip of random data keeps all of them within 1 % with a
probability far below 1e-9 (with 2, about 5e-4 of flips went unnoticed)."""


def fingerprint(x: Tensor) -> Tensor:
    """(B, ...) -> (B, 8) float32 on the CPU: fixed random ±1 projections of each sample, divided by
    sqrt(numel). A flip, crop or other change of the sample moves them by about its RMS; the
    rounding of another dtype by far less. A sample with a NaN or an infinity has a non-finite one."""
    flat = x.detach().flatten(1).float()  # (B, n)
    return (flat @ _signs(flat.shape[1], flat.device) / flat.shape[1] ** 0.5).cpu()  # (B, 8)


@functools.lru_cache(maxsize=8)
def _signs(n: int, device: torch.device) -> Tensor:
    """(n, 8) fixed ±1 (seeded by n), made once per size and device."""
    gen = torch.Generator().manual_seed(n)
    return (torch.randint(0, 2, (n, FINGERPRINT_SIZE), generator=gen) * 2 - 1).float().to(device)


def same_sample(cached: Tensor, now: Tensor) -> Tensor:
    """(B, 8), (B, 8) fingerprints -> (B,) bool: the same sample, up to dtype rounding."""
    scale = cached.abs().amax(1).clamp_min(1e-6)
    return ((cached - now).abs().amax(1) <= 1e-2 * scale)
