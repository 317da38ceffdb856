"""Teacher-feature cache (SPEC section 4): each sample's teacher tokens computed once, keyed by its
stable id (`batch[ids_key]`, and `batch[views_key]` for augmented views), stored in half precision,
and read back in later epochs and runs. No Lightning.

- :class:`MemoryStore`: a dict in RAM (`cache="memory"`), for one process.
- :class:`DiskStore`: a directory (`cache="disk"`, `cache_dir`) of safetensors shards, memory-mapped
  when read, shared by ranks and runs. Every shard is written to a hidden temporary file and renamed
  into place, so a run killed while writing leaves no partial shard; `meta.json` records how the
  features were made (encoder, its checkpoint's hash, image size, resize rule, latent decoder,
  package version) and a cache made otherwise is refused, naming the fields that differ. Claims
  (one file per key, created exclusively) make concurrent ranks compute each sample once.
- :class:`CachedTeacher`: wraps a teacher (`EncoderTeacher`) with a store; same call.

Augmentation: a cached sample must look the same every time its key comes back. Each entry keeps a
fingerprint of what the teacher saw (the clean latents, or the pixels with decoder=pixels); a sample
that comes back different (a random crop or flip) is refused, since its cached features belong to
another image. Give each view its own key (`views_key`: e.g. the flip flag or crop index) to cache
every view, or train with cache=none.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn

from lightning_repa.align import Grid
from lightning_repa.capture import Captured
from lightning_repa.config import Decoder, RepaConfig

FORMAT_VERSION = 1
"""Layout of a disk cache; part of its metadata."""
Entry = tuple[Tensor, Grid, Tensor]
"""One sample: tokens float16 on the CPU ((M, D) per image, (T, M, D) per video), grid, fingerprint (2,)."""


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


def fingerprint(x: Tensor) -> Tensor:
    """(B, ...) -> (B, 2) float32 on the CPU: two fixed random projections of each sample, scaled
    to its RMS. A flip, crop or other change of the sample moves them by about its RMS; the
    rounding of another dtype by far less."""
    flat = x.detach().flatten(1).float()  # (B, n)
    return (flat @ _signs(flat.shape[1], flat.device) / flat.shape[1] ** 0.5).cpu()  # (B, 2)


@functools.lru_cache(maxsize=8)
def _signs(n: int, device: torch.device) -> Tensor:
    """(n, 2) fixed ±1 (seeded by n), made once per size and device."""
    gen = torch.Generator().manual_seed(n)
    return (torch.randint(0, 2, (n, 2), generator=gen) * 2 - 1).float().to(device)


def same_sample(cached: Tensor, now: Tensor) -> Tensor:
    """(B, 2), (B, 2) fingerprints -> (B,) bool: the same sample, up to dtype rounding."""
    scale = cached.abs().amax(1).clamp_min(1e-6)
    return ((cached - now).abs().amax(1) <= 1e-2 * scale)


class FeatureStore(Protocol):
    def get(self, keys: list[str]) -> dict[str, Entry]:
        """The entries of `keys` that the store holds."""
        ...

    def put(self, entries: Mapping[str, Entry]) -> None: ...

    def claim(self, keys: list[str]) -> list[str]:
        """The keys this process should compute now (others are being computed elsewhere)."""
        ...

    def release(self, keys: Iterable[str]) -> None:
        """Give up claims without storing (the computation failed)."""
        ...


class MemoryStore:
    """Entries in a dict, in this process's RAM."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def get(self, keys: list[str]) -> dict[str, Entry]:
        return {k: self.entries[k] for k in keys if k in self.entries}

    def put(self, entries: Mapping[str, Entry]) -> None:
        self.entries.update(entries)

    def claim(self, keys: list[str]) -> list[str]:
        return list(keys)

    def release(self, keys: Iterable[str]) -> None:
        """Nothing to release: one process, no claims."""

    def __len__(self) -> int:
        return len(self.entries)


class StaleCacheError(ValueError):
    """A disk cache written with other settings than this run's."""


class DiskStore:
    """Entries in safetensors shards under `root`, shared by processes; see the module docstring.

    Layout: `meta.json`; `shards/*.safetensors` (tensors `t/<key>` tokens float16 and `f/<key>`
    fingerprints; the grids in the shard's metadata); `claims/<hash>` while a key is computed.
    A claim older than `claim_timeout` seconds, or whose process is gone, is taken over.
    `shard_size` > 0 buffers entries until that many are put (then `flush`); 0 writes each `put`.
    """

    def __init__(self, root: str | os.PathLike, metadata: Mapping[str, Any], claim_timeout: float = 600.0,
                 shard_size: int = 0) -> None:
        self.root = Path(root)
        self.shards, self.claims = self.root / "shards", self.root / "claims"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.claims.mkdir(exist_ok=True)
        self.metadata = dict(metadata)
        self.claim_timeout, self.shard_size = claim_timeout, shard_size
        self.pending: dict[str, Entry] = {}  # put, not yet written (fewer than shard_size)
        self.index: dict[str, Path] = {}  # key -> shard
        self._handles: OrderedDict[Path, tuple[Any, dict[str, list[int]]]] = OrderedDict()  # open shards
        self.max_open = 256
        self._seen: set[str] = set()  # shard names read
        self._mine: set[str] = set()  # keys this store claimed
        self.token = uuid.uuid4().hex  # tells this store's claims from other stores' of this process
        self._open_meta()
        self.refresh()

    # --- metadata -----------------------------------------------------------------------------
    def _open_meta(self) -> None:
        path = self.root / "meta.json"
        if not path.exists():
            tmp = self.root / f".meta-{uuid.uuid4().hex}.json"
            tmp.write_text(json.dumps(self.metadata, indent=2, sort_keys=True))
            try:
                os.link(tmp, path)  # atomic: fails if another process created it first
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        cached = json.loads(path.read_text())
        differ = [k for k in sorted(set(cached) | set(self.metadata)) if cached.get(k) != self.metadata.get(k)]
        if differ:
            lines = "; ".join(f"{k}: cached {cached.get(k)!r}, now {self.metadata.get(k)!r}" for k in differ)
            raise StaleCacheError(
                f"the teacher cache at {str(self.root)!r} was made with other settings ({lines}): its features "
                "are not this teacher's. Use another `cache_dir`, or delete that directory to compute them again"
            )

    # --- reading ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Index the shards written since the last call (by any process)."""
        from safetensors import safe_open

        for name in sorted(os.listdir(self.shards)):
            if name.startswith(".") or not name.endswith(".safetensors") or name in self._seen:
                continue
            self._seen.add(name)
            try:
                with safe_open(self.shards / name, "pt") as f:
                    keys = [k[2:] for k in f.keys() if k.startswith("t/")]
            except Exception as error:  # noqa: BLE001 - a foreign or damaged file is skipped, not fatal
                warnings.warn(f"teacher cache: skipping unreadable shard {name} ({error})", stacklevel=2)
                continue
            self.index.update(dict.fromkeys(keys, self.shards / name))

    def get(self, keys: list[str]) -> dict[str, Entry]:
        if any(k not in self.index for k in keys):
            self.refresh()
        by_shard: dict[Path, list[str]] = {}
        for k in keys:
            if k in self.index:
                by_shard.setdefault(self.index[k], []).append(k)
        out = {k: self.pending[k] for k in keys if k in self.pending}
        for shard, names in by_shard.items():
            f, grids = self._open(shard)
            for k in names:
                out[k] = (f.get_tensor(f"t/{k}"), tuple(grids[k]), f.get_tensor(f"f/{k}"))
        return out

    def _open(self, shard: Path) -> tuple[Any, dict[str, list[int]]]:
        """The shard's reader (memory-mapped: reads only the tensors asked for) and grids; the last
        `max_open` shards stay open."""
        from safetensors import safe_open

        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            f = safe_open(shard, "pt")
            self._handles[shard] = (f, json.loads(f.metadata()["grids"]))
            if len(self._handles) > self.max_open:
                self._handles.popitem(last=False)
        return self._handles[shard]

    def __len__(self) -> int:
        self.refresh()
        return len(self.index.keys() | self.pending.keys())

    # --- writing ------------------------------------------------------------------------------
    def put(self, entries: Mapping[str, Entry]) -> None:
        """Store `entries`: written now, or once `shard_size` entries are pending."""
        self.pending.update(entries)
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one new shard: a hidden file renamed into place (atomic)."""
        from safetensors.torch import save_file

        entries, self.pending = self.pending, {}
        if not entries:
            return
        tensors = {}
        for k, (tokens, _, prints) in entries.items():
            tensors[f"t/{k}"] = tokens.to("cpu", torch.float16).contiguous()
            tensors[f"f/{k}"] = prints.to("cpu", torch.float32).contiguous()
        grids = json.dumps({k: list(grid) for k, (_, grid, _) in entries.items()})
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.shards / f".{name}.tmp"
        save_file(tensors, tmp, metadata={"grids": grids})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.shards / f"{name}.safetensors")
        self._seen.add(f"{name}.safetensors")
        self.index.update(dict.fromkeys(entries, self.shards / f"{name}.safetensors"))
        self.release(entries)

    # --- claims -------------------------------------------------------------------------------
    def claim(self, keys: list[str]) -> list[str]:
        mine = [k for k in keys if self._try_claim(k)]
        self.refresh()  # written by another process between the lookup and the claim
        done = [k for k in mine if k in self.index]
        self.release(done)
        return [k for k in mine if k not in self.index]

    def release(self, keys: Iterable[str]) -> None:
        for k in keys:
            if k in self._mine:
                self._mine.discard(k)
                self._claim_path(k).unlink(missing_ok=True)

    def _claim_path(self, key: str) -> Path:
        return self.claims / hashlib.sha1(key.encode()).hexdigest()

    def _try_claim(self, key: str) -> bool:
        path = self._claim_path(key)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale(path):
                    return False
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()} {self.token}")
            self._mine.add(key)
            return True
        return False

    def _stale(self, path: Path) -> bool:
        """A claim whose process is gone (same host), left by an earlier store of this process (which
        no longer computes: this one is waiting), or older than `claim_timeout`."""
        try:
            host, pid, token = path.read_text().split()
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            return False  # being written or just released
        if age > self.claim_timeout:
            return True
        if host != socket.gethostname():
            return False
        if int(pid) == os.getpid():
            return token != self.token
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class CachedTeacher:
    """Wraps a teacher (`EncoderTeacher`): tokens of each key computed once, then read from `store`.

    Same call as the teacher: `(batch, latents, captured) -> (tokens, grid)`. Returns float32 tokens
    on the latents' device, equal to the uncached ones to half precision. `hits` and `misses` count
    samples of this process; a miss another process computes meanwhile counts as a hit.
    """

    def __init__(self, teacher: Any, store: FeatureStore, ids_key: str = "ids", views_key: Optional[str] = None,
                 poll: float = 0.05) -> None:
        self.teacher, self.store, self.ids_key, self.views_key, self.poll = teacher, store, ids_key, views_key, poll
        self.hits = self.misses = 0
        self._warned_wait = False

    @property
    def embed_dim(self) -> Optional[int]:
        return self.teacher.embed_dim

    @property
    def temporal_ratio(self) -> Optional[int]:
        return getattr(self.teacher, "temporal_ratio", None)

    def set_autocast(self, dtype: Optional[torch.dtype]) -> None:
        self.teacher.set_autocast(dtype)

    def to(self, *args: Any, **kwargs: Any) -> "CachedTeacher":
        self.teacher.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any], latents: Tensor, captured: Optional[Captured] = None) -> tuple[Tensor, Grid]:
        size = latents.shape[0]
        keys = cache_keys(batch, self.ids_key, self.views_key, size)
        prints = fingerprint(self.teacher.source(batch, latents))  # (B, 2)
        found = self.store.get(keys)
        pending = [i for i, k in enumerate(keys) if k not in found]
        computed, since = 0, time.monotonic()
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
                found.update(self.store.get([keys[i] for i in pending]))
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
        return self._assemble(keys, found, prints, latents)

    def _compute(self, batch: Mapping[str, Any], latents: Tensor, captured: Optional[Captured], rows: list[int],
                 keys: list[str], prints: Tensor) -> dict[str, Entry]:
        size = latents.shape[0]
        index = torch.tensor(rows, device=latents.device)
        sub = {k: v.index_select(0, index.to(v.device)) for k, v in batch.items()
               if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size}
        tokens, grid = self.teacher(sub, latents.index_select(0, index), captured)
        entries = {keys[i]: (tokens[j].to("cpu", torch.float16), tuple(grid), prints[i]) for j, i in enumerate(rows)}
        self.store.put(entries)
        return entries

    def _assemble(self, keys: list[str], found: Mapping[str, Entry], prints: Tensor,
                  latents: Tensor) -> tuple[Tensor, Grid]:
        cached = torch.stack([found[k][2] for k in keys])  # (B, 2)
        changed = [k for k, ok in zip(keys, same_sample(cached, prints).tolist()) if not ok]
        if changed:
            what = "views (`views_key`)" if self.views_key else "ids"
            raise ValueError(
                f"the teacher cache holds features of other images under the {what} {changed[:5]}: the samples came "
                "back different (random crops or flips, or other data under the same id). Give each view its own id "
                "in batch[views_key] (set `views_key`), keep augmentation out of cached runs, or use cache=none"
            )
        grids = {found[k][1] for k in keys}
        if len(grids) > 1:
            raise ValueError(f"the cached teacher tokens of this batch lie on different grids {sorted(grids)}: "
                             "images of one batch must have one size")
        tokens = torch.stack([found[k][0] for k in keys])
        return tokens.to(latents.device, torch.float32), grids.pop()


def cache_metadata(cfg: RepaConfig, teacher: Any) -> dict[str, Any]:
    """How the teacher makes its features, as a disk cache records and checks it."""
    from lightning_repa import __version__
    from lightning_repa.encoders import RESIZE_RULE  # imports timm

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

