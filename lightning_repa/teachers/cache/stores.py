"""Where the teacher-feature cache keeps its entries. No Lightning.

- :class:`MemoryStore`: a dict in RAM (`cache="memory"`), for one process.
- :class:`DiskStore`: a directory (`cache="disk"`, `cache_dir`) of safetensors shards, memory-mapped
  when read, shared by ranks and runs. Every shard is written to a hidden temporary file and renamed
  into place, so a run killed while writing leaves no partial shard; `meta.json` records how the
  features were made (`metadata.cache_metadata`) and a cache made otherwise is refused, naming the
  fields that differ. Claims (one file per key, created exclusively) make concurrent ranks compute
  each sample once.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
import uuid
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import torch
from torch import Tensor

from lightning_repa.maths.align import Grid

Entry = tuple[Tensor, Grid, Tensor]
"""One sample: tokens float16 on the CPU ((M, D) per image, (T, M, D) per video), grid, fingerprint (2,)."""


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
        self.entries.update(finite_entries(entries))

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
    fingerprints; the grids and a CRC-32 of each entry's bytes in the shard's metadata, written with
    it); `claims/<hash>` while a key is computed. A claim older than `claim_timeout` seconds, or whose
    process is gone, is taken over. `shard_size` > 0 buffers entries until that many are put (then
    `flush`); 0 writes each `put`. An entry whose checksum does not match is not read (it is computed
    again, with a warning); entries with a NaN or an infinity are never stored. A directory that
    cannot be written (a read-only mount) is read as it is: what it lacks is computed and kept in
    memory for this run, with one warning.
    """

    def __init__(self, root: str | os.PathLike, metadata: Mapping[str, Any], claim_timeout: float = 600.0,
                 shard_size: int = 0) -> None:
        self.root = Path(root)
        self.shards, self.claims = self.root / "shards", self.root / "claims"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.claims.mkdir(exist_ok=True)
        self.metadata = json.loads(json.dumps(dict(metadata), default=str))  # as meta.json gives it back
        self.claim_timeout, self.shard_size = claim_timeout, shard_size
        self.pending: dict[str, Entry] = {}  # put, not yet written (fewer than shard_size)
        self.index: dict[str, Path] = {}  # key -> shard
        self._handles: OrderedDict[Path, tuple[Any, dict[str, list[int]]]] = OrderedDict()  # open shards
        self.max_open = 256
        self._seen: set[str] = set()  # shard names read
        self._mine: set[str] = set()  # keys this store claimed
        self.token = uuid.uuid4().hex  # tells this store's claims from other stores' of this process
        self._open_meta()
        self.read_only = not _writable(self.claims)
        self.kept: dict[str, Entry] = {}  # read-only: computed here, kept in memory
        if self.read_only:
            warnings.warn(f"teacher cache: {str(self.root)!r} is read-only; samples missing from it are computed "
                          "and kept in memory for this run, not stored", UserWarning, stacklevel=3)
        self.refresh()

    # --- metadata -----------------------------------------------------------------------------
    def _open_meta(self) -> None:
        path = self.root / "meta.json"
        if not path.exists():
            tmp = self.root / f".meta-{uuid.uuid4().hex}.json"
            if not _writable(self.root):
                raise OSError(f"teacher cache: {str(self.root)!r} holds no cache (no meta.json) and cannot be "
                              "written: give a writable `cache_dir`, or precompute the cache there first")
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
        out.update({k: self.kept[k] for k in keys if k in self.kept})
        for shard, names in by_shard.items():
            f, grids, sums = self._open(shard)
            for k in names:
                entry = (f.get_tensor(f"t/{k}"), tuple(grids[k]), f.get_tensor(f"f/{k}"))
                if entry_checksum(entry) == sums.get(k):
                    out[k] = entry
                    continue
                del self.index[k]  # computed again (and stored in a newer shard); this shard is not read again
                warnings.warn(f"teacher cache: the checksum of {k!r} in {shard.name} does not match its bytes (a "
                              "damaged file): it is recomputed, not read", UserWarning, stacklevel=2)
        return out

    def _open(self, shard: Path) -> tuple[Any, dict[str, list[int]], dict[str, int]]:
        """The shard's reader (memory-mapped: reads only the tensors asked for), grids and checksums;
        the last `max_open` shards stay open."""
        from safetensors import safe_open

        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            f = safe_open(shard, "pt")
            meta = f.metadata()
            self._handles[shard] = (f, json.loads(meta["grids"]), json.loads(meta.get("crc32", "{}")))
            if len(self._handles) > self.max_open:
                self._handles.popitem(last=False)
        return self._handles[shard]

    def __len__(self) -> int:
        self.refresh()
        return len(self.index.keys() | self.pending.keys() | self.kept.keys())

    # --- writing ------------------------------------------------------------------------------
    def put(self, entries: Mapping[str, Entry]) -> None:
        """Store `entries` (finite ones only): written now, or once `shard_size` entries are pending."""
        entries = finite_entries(entries)
        if self.read_only:
            self.kept.update(entries)
            return
        self.pending.update(entries)
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one new shard: a hidden file renamed into place (atomic)."""
        from safetensors.torch import save_file

        entries, self.pending = self.pending, {}
        if not entries:
            return
        tensors, sums = {}, {}
        for k, (tokens, grid, prints) in entries.items():
            tensors[f"t/{k}"] = tokens.to("cpu", torch.float16).contiguous()
            tensors[f"f/{k}"] = prints.to("cpu", torch.float32).contiguous()
            sums[k] = entry_checksum((tensors[f"t/{k}"], grid, tensors[f"f/{k}"]))
        grids = json.dumps({k: list(grid) for k, (_, grid, _) in entries.items()})
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.shards / f".{name}.tmp"
        save_file(tensors, tmp, metadata={"grids": grids, "crc32": json.dumps(sums)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.shards / f"{name}.safetensors")
        self._seen.add(f"{name}.safetensors")
        self.index.update(dict.fromkeys(entries, self.shards / f"{name}.safetensors"))
        self.release(entries)

    # --- claims -------------------------------------------------------------------------------
    def claim(self, keys: list[str]) -> list[str]:
        if self.read_only:
            return list(keys)  # no claim files; nothing is shared
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


def finite_entries(entries: Mapping[str, Entry]) -> dict[str, Entry]:
    """The entries whose tokens and fingerprint are finite (a NaN sample is never stored)."""
    return {k: e for k, e in entries.items() if bool(torch.isfinite(e[0]).all()) and bool(torch.isfinite(e[2]).all())}


def entry_checksum(entry: Entry) -> int:
    """CRC-32 of an entry's float16 tokens and float32 fingerprint, as stored."""
    tokens, _, prints = entry
    crc = zlib.crc32(tokens.to(torch.float16).contiguous().numpy().tobytes())
    return zlib.crc32(prints.to(torch.float32).contiguous().numpy().tobytes(), crc)


def _writable(directory: Path) -> bool:
    """Whether a file can be created in `directory` (False on a read-only mount or without permission)."""
    probe = directory / f".probe-{uuid.uuid4().hex}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return False
        raise
    probe.unlink()
    return True
