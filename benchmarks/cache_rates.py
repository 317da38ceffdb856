"""What the disk teacher cache costs: ``lightning-repa-cache`` filling a fresh cache (samples computed per
second: decode nothing, encode every image, write safetensors shards) and the same command again on
the full cache (samples read back per second: every entry looked up, memory-mapped and its fingerprint
compared), on the digits data of ``experiment=demo``, with two teachers:

- ``demo``: the shipped tiny digits ViT at 16 px (the demo's own cache);
- ``vits14_224``: DINOv2 ViT-S/14 (random weights, the ``--checkpoint`` file) at 224 px, a real
  encoder's cost per image (limited to ``max_batches`` batches of 64).

The rates are the command's own timing of its loop (``seconds`` in its summary line, which leaves the
process start and imports out). It prints them to 0.1 s: a read that printed 0.0 s is reported as a
lower bound (``at_least``: the samples in 0.05 s); the wall time of each command is kept beside them.

    python benchmarks/cache_rates.py --checkpoint dinov2_vits14.pth --json rates.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

SUMMARY = re.compile(r"(\d+) samples read, (\d+) computed, (\d+) already cached; (\d+) entries in .*; ([\d.]+) s")


def run_cache(overrides: list[str], threads: int) -> dict[str, Any]:
    """One ``lightning-repa-cache`` command; its summary line parsed."""
    command = ["lightning-repa-cache", "experiment=demo", f"torch_threads={threads}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - start
    match = SUMMARY.search(proc.stdout + proc.stderr)
    if proc.returncode or match is None:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    read, computed, cached, entries, seconds = match.groups()
    return {"samples": int(read), "computed": int(computed), "cached": int(cached), "entries": int(entries),
            "seconds": float(seconds), "wall_seconds": wall}


def rate(samples: int, seconds: float) -> dict[str, Any]:
    """Samples per second; the command prints its seconds to 0.1 s, so a printed 0.0 gives a lower bound
    (the time was under 0.05 s)."""
    if seconds > 0:
        return {"samples_per_s": samples / seconds, "at_least": False}
    return {"samples_per_s": samples / 0.05, "at_least": True}


def teacher_rates(name: str, overrides: list[str], threads: int, max_batches: Optional[int] = None) -> dict[str, Any]:
    """Fill a fresh cache, then read it back with the same command."""
    with tempfile.TemporaryDirectory(prefix="repa_cache_rates_") as tmp:
        cache_dir = os.path.join(tmp, "cache")
        args = [f"repa.cache_dir={cache_dir}", f"hydra.run.dir={tmp}/run", *overrides]
        if max_batches is not None:
            args.append(f"precompute.max_batches={max_batches}")
        fill = run_cache(args, threads)
        read = run_cache(args, threads)
        size = sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file())
    if fill["computed"] != fill["samples"] or read["computed"] != 0:
        raise RuntimeError(f"{name}: expected a fresh fill and a full read, got {fill} then {read}")
    return {"fill": fill, "read": read, "fill_rate": rate(fill["computed"], fill["seconds"]),
            "read_rate": rate(read["samples"], read["seconds"]), "cache_bytes": size,
            "bytes_per_sample": size / max(fill["samples"], 1), "overrides": [_public(o) for o in overrides]}


def _public(override: str) -> str:
    """An override as recorded: a checkpoint path (often temporary) becomes its file name."""
    key, _, value = override.partition("=")
    return f"{key}={Path(value).name}" if key.endswith("checkpoint") else override


def cache_rates(checkpoint: Optional[str], threads: int = 1, quick: bool = False,
                max_batches: int = 8) -> dict[str, Any]:
    """The fill and read rates of the demo's teacher and, with ``checkpoint``, of ViT-S/14 at 224 px."""
    out = {"demo": teacher_rates("demo", ["precompute.split=all"], threads), "threads": threads}
    if checkpoint is not None:
        size = 28 if quick else 224
        out["vits14_224"] = teacher_rates("vits14_224", [
            "encoder=dinov2_vits14", f"repa.encoder_checkpoint={checkpoint}", f"repa.encoder_image_size={size}"],
            threads, max_batches=1 if quick else max_batches)
    for name in ("demo", "vits14_224"):
        if name in out:
            r = out[name]
            fill, read = r["fill_rate"], r["read_rate"]
            print(f"cache {name}: fill {'>' if fill['at_least'] else ''}{fill['samples_per_s']:.0f} samples/s "
                  f"({r['fill']['computed']} in {r['fill']['seconds']:.1f} s), read "
                  f"{'>' if read['at_least'] else ''}{read['samples_per_s']:.0f} samples/s "
                  f"({r['read']['samples']} in {r['read']['seconds']:.1f} s), "
                  f"{r['bytes_per_sample'] / 1024:.1f} KiB a sample", flush=True)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a ViT-S/14 checkpoint (timm or official format) for the 224 px teacher")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batches", type=int, default=8, help="batches of 64 the ViT-S/14 cache holds")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rates = cache_rates(args.checkpoint, args.threads, args.quick, args.max_batches)
    if args.json:
        print(f"wrote {write_json(args.json, rates)}")


if __name__ == "__main__":
    main()
