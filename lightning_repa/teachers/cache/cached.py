"""The caching teacher: wraps a teacher with a feature store, same call. No Lightning."""

from __future__ import annotations

import time
import warnings
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from lightning_repa.maths.align import TeacherTokens
from lightning_repa.models.capture import Captured
from lightning_repa.teachers.cache.keys import cache_keys, fingerprint, same_sample
from lightning_repa.teachers.cache.stores import Entry, FeatureStore


class CachedTeacher:
    """Wraps a teacher (`EncoderTeacher`): tokens of each key computed once, then read from `store`.

    Same call as the teacher: `(batch, latents, captured) -> TeacherTokens`. Returns float32 tokens
    on the latents' device, equal to the uncached ones to half precision. `hits` and `misses` count
    samples of this process; a miss another process computes meanwhile counts as a hit. A sample
    with a NaN or an infinity (in what the teacher sees, or in its tokens) is computed every time and
    never stored: its step is skipped like any non-finite step, and a fixed image is computed anew.
    """

    def __init__(self, teacher: Any, store: FeatureStore, ids_key: str = "ids", views_key: Optional[str] = None,
                 poll: float = 0.05) -> None:
        self.teacher, self.store, self.ids_key, self.views_key, self.poll = teacher, store, ids_key, views_key, poll
        self.hits = self.misses = 0
        self._warned_wait = False

    @property
    def embed_dim(self) -> Optional[int]:
        return self.teacher.embed_dim

    def set_autocast(self, dtype: Optional[torch.dtype]) -> None:
        self.teacher.set_autocast(dtype)

    def to(self, *args: Any, **kwargs: Any) -> "CachedTeacher":
        self.teacher.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any], latents: Tensor, captured: Optional[Captured] = None) -> TeacherTokens:
        size = latents.shape[0]
        keys = cache_keys(batch, self.ids_key, self.views_key, size)
        prints = fingerprint(self.teacher.source(batch, latents))  # (B, 8)
        finite = torch.isfinite(prints).all(1).tolist()
        found = self.store.get([k for k, ok in zip(keys, finite) if ok])
        stored = set(found)  # read from the store: their fingerprints are compared below
        broken = [i for i, ok in enumerate(finite) if not ok]
        if broken:  # computed, never stored
            found.update(self._compute(batch, latents, captured, broken, keys, prints, store=False))
        pending = [i for i, k in enumerate(keys) if k not in found]
        computed, since = len(broken), time.monotonic()
        while pending:
            mine = set(self.store.claim([keys[i] for i in pending]))
            rows = [i for i in pending if keys[i] in mine]
            if rows:
                try:
                    found.update(self._compute(batch, latents, captured, rows, keys, prints))
                except BaseException:
                    self.store.release(keys[i] for i in rows)  # others must not wait for these
                    raise
                computed += len(rows)
            pending = [i for i in pending if keys[i] not in found]
            if pending:  # being computed by another process
                arrived = self.store.get([keys[i] for i in pending])
                found.update(arrived)
                stored |= set(arrived)
                pending = [i for i in pending if keys[i] not in found]
                if pending:
                    time.sleep(self.poll)
                    if time.monotonic() - since > 60 and not self._warned_wait:
                        self._warned_wait = True
                        warnings.warn(f"teacher cache: waiting for {len(pending)} samples another process claimed "
                                      f"(e.g. {keys[pending[0]]!r}); a claim of a stuck process expires after "
                                      "`claim_timeout`", stacklevel=2)
        self.misses += computed
        self.hits += size - computed
        return self._assemble(keys, found, stored, prints, latents)

    def _compute(self, batch: Mapping[str, Any], latents: Tensor, captured: Optional[Captured], rows: list[int],
                 keys: list[str], prints: Tensor, store: bool = True) -> dict[str, Entry]:
        size = latents.shape[0]
        index = torch.tensor(rows, device=latents.device)
        sub = {k: v.index_select(0, index.to(v.device)) for k, v in batch.items()
               if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size}
        out = self.teacher(sub, latents.index_select(0, index), captured)
        entries = {keys[i]: (out.tokens[j].to("cpu", torch.float16), tuple(out.grid), prints[i])
                   for j, i in enumerate(rows)}
        if store:
            self.store.put(entries)  # the stores keep finite entries only
            self.store.release(k for k, e in entries.items() if not bool(torch.isfinite(e[0]).all()))
        return entries

    def _assemble(self, keys: list[str], found: Mapping[str, Entry], stored: set[str], prints: Tensor,
                  latents: Tensor) -> TeacherTokens:
        rows = [i for i, k in enumerate(keys) if k in stored]
        if rows:
            cached = torch.stack([found[keys[i]][2] for i in rows])  # (R, 8)
            changed = [keys[i] for i, ok in zip(rows, same_sample(cached, prints[rows]).tolist()) if not ok]
            if changed:
                what = "views (`views_key`)" if self.views_key else "ids"
                raise ValueError(
                    f"the teacher cache holds features of other images under the {what} {changed[:5]}: the samples "
                    "came back different (random crops or flips, or other data under the same id). Give each view its "
                    "own id in batch[views_key] (set `views_key`), keep augmentation out of cached runs, or use "
                    "cache=none"
                )
        grids = {found[k][1] for k in keys}
        if len(grids) > 1:
            raise ValueError(f"the cached teacher tokens of this batch lie on different grids {sorted(grids)}: "
                             "images of one batch must have one size")
        tokens = torch.stack([found[k][0] for k in keys])
        return TeacherTokens(tokens.to(latents.device, torch.float32), grids.pop(), self.teacher.frames_per_latent)
