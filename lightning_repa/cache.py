"""Teacher-feature cache in memory (SPEC section 4): each sample's teacher tokens are computed once,
keyed by its stable id (`batch[ids_key]`), kept in half precision on the CPU, and reused in later
epochs, so a cached step decodes and encodes only the samples it has not seen. No Lightning.

The cache assumes a sample's clean image is the same every time its id comes back: data sets of
precomputed latents (the usual diffusion fine-tune) satisfy it. With random crops or flips the
teacher would see only the first view of each sample, so train with `cache="none"` there, or give
each view its own id.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional

import torch
from torch import Tensor

from lightning_repa.align import Grid
from lightning_repa.capture import Captured


def sample_ids(batch: Mapping[str, Any], key: str, size: int) -> list[Hashable]:
    """The batch's sample ids as hashable Python values; errors name `ids_key`."""
    if key not in batch:
        raise KeyError(
            f"the teacher cache reads stable sample ids from batch[{key!r}], which is missing (keys: {sorted(batch)}); "
            "return them from your dataset or set `ids_key` (or use cache=none)"
        )
    ids = batch[key]
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if len(ids) != size or len(set(map(str, ids))) != size:
        raise ValueError(f"batch[{key!r}] must hold one distinct id per sample ({size}), got {ids}")
    return ids


class MemoryCachedTeacher:
    """Wraps a teacher (`EncoderTeacher`): tokens of each sample id computed once, then read back.

    Same call as the teacher: `(batch, latents, captured) -> (tokens, grid)`. The stored tokens are
    float16 on the CPU (`tokens` (M, D) per image, (T, M, D) per video); the returned ones float32 on
    the latents' device, equal to the uncached ones to half precision. `hits` and `misses` count samples.
    """

    def __init__(self, teacher: Any, ids_key: str = "ids") -> None:
        self.teacher, self.ids_key = teacher, ids_key
        self.store: dict[Hashable, tuple[Tensor, Grid]] = {}
        self.hits = self.misses = 0

    @property
    def embed_dim(self) -> Optional[int]:
        return self.teacher.embed_dim

    @property
    def temporal_ratio(self) -> Optional[int]:
        return getattr(self.teacher, "temporal_ratio", None)

    def to(self, *args: Any, **kwargs: Any) -> "MemoryCachedTeacher":
        self.teacher.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any], latents: Tensor, captured: Optional[Captured] = None) -> tuple[Tensor, Grid]:
        size = latents.shape[0]
        ids = sample_ids(batch, self.ids_key, size)
        missing = [i for i, sample in enumerate(ids) if sample not in self.store]
        if missing:
            rows = torch.tensor(missing, device=latents.device)
            sub = {k: v.index_select(0, rows.to(v.device)) for k, v in batch.items()
                   if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size}
            tokens, grid = self.teacher(sub, latents.index_select(0, rows), captured)
            for j, i in enumerate(missing):
                self.store[ids[i]] = (tokens[j].to("cpu", torch.float16), tuple(grid))
        self.misses += len(missing)
        self.hits += size - len(missing)
        grids = {self.store[sample][1] for sample in ids}
        if len(grids) > 1:
            raise ValueError(f"the cached teacher tokens of this batch lie on different grids {sorted(grids)}: "
                             "images of one batch must have one size")
        tokens = torch.stack([self.store[sample][0] for sample in ids])
        return tokens.to(latents.device, torch.float32), grids.pop()
