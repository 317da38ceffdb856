"""What REPA costs per optimizer step: the same DiT trained without the callback (baseline), with REPA
uncached, with REPA cached (``cache="memory"``, warm) and at weight 0 (``lam=0``), at two model sizes,
each mode reported as a ratio to the baseline with a 95 % bootstrap interval, with its peak memory;
and what filling and reading the disk teacher cache costs (``lightning-repa-cache``, samples/s).

Each mode is a ``trainer.fit`` of a fresh copy of the same denoiser on the same batches, and the time
from ``on_train_batch_start`` to ``on_train_batch_end`` of every step after the first epoch (which
fills the cache and warms every mode alike) is recorded (``overhead_fits.py``). The fits of a round
run side by side in threads that take turns step by step (only one runs at a time: ``common.take_turns``),
so any few seconds hold one step of each mode and a busy machine's drift hits them alike; ``--repeats``
rounds rotate the order. Two probes take turns in the same rounds: decode + encode alone (the VAE's
decode and the ViT-S/14, the work an uncached step adds) and the alignment alone (projector + loss,
forward and backward: the floor of a cached step).

Per mode: the min and the median over rounds of each fit's median step and their ratios to the
baseline's; the paired ratio, the median over steps of step / the baseline's step of the same turn,
with a 95 % two-level bootstrap interval (rounds resampled, then the steps inside each; 2,000
resamples, seed 0); the host time inside the callback per step; the peak memory of a fresh process.
Targets, judged on the interval's upper bound: cached <= 1.05x, weight 0 <= 1.01x (within noise of
1.00x), uncached overhead <= 1.10x decode + encode alone; ``--check`` exits with 1 when one is missed.

Sizes (``--sizes``): ``base`` (PixArt, hidden 128, 8 blocks, 2.3 M parameters) and ``4x`` (hidden 256,
8 blocks: 4x the parameters); families without a size rule run at their tiny size.

    python benchmarks/overhead.py --threads 1 --clock cpu --repeats 7 --json docs/overhead.json
    python benchmarks/overhead.py --device cuda --json overhead_cuda.json      # bf16-mixed on a GPU
    python benchmarks/overhead.py --quick --json out.json   # tiny sizes, 2 rounds: a smoke test (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import cluster_bootstrap_ci, machine, quiet, write_json  # noqa: E402

MODES = ("baseline", "uncached", "cached", "weight0")
TARGETS = {"cached": 1.05, "weight0": 1.01, "uncached_vs_decode_encode": 1.10}  # on the 95 % upper bound
SIZES = {"base": dict(heads=4, head_dim=32, depth=8), "4x": dict(heads=8, head_dim=32, depth=8)}
CHECKPOINT_NAME = "dinov2_vits14_random.pth"


@dataclass
class Settings:
    """Everything a run depends on; passed as JSON to the peak-memory worker processes."""

    family: str = "pixart"
    size: str = "base"
    heads: int = 4
    head_dim: int = 32  # hidden = heads * head_dim
    depth: int = 8  # transformer blocks
    block_index: Optional[int] = None  # None: REPA's block 8 of 28, scaled to `depth`
    latent: int = 16  # latent side: (B, C, latent, latent)
    batch_size: int = 4
    batches: int = 4  # batches per epoch; the first epoch is not timed (it fills the cache)
    steps: int = 16  # timed optimizer steps per fit
    repeats: int = 5  # rounds over the modes
    encoder_image_size: int = 112  # ViT-S/14: 8x8 teacher tokens
    decoder: str = "vae"  # vae | pixels (families whose latents a KL VAE cannot decode use pixels)
    vae_channels: tuple[int, ...] = (8, 16, 32, 32)  # 4 levels: 8x downsampling like SD/FLUX VAEs
    optimizer: str = "adamw"
    lr: float = 1e-4
    device: str = "cpu"
    precision: str = "32-true"  # bf16-mixed by default on CUDA
    threads: int = 0  # 0: torch's default
    clock: str = "wall"  # wall | cpu (this process's CPU time: robust on a shared machine, with threads=1)
    memory: bool = True  # measure peak memory per mode in fresh processes

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    def aligned_block(self) -> int:
        from overhead_fits import SCALERS

        if self.block_index is not None:
            return self.block_index
        return max(1, round(self.depth * 8 / 28)) if self.family in SCALERS else 1

    def now(self) -> Callable[[], float]:
        """The clock: wall time (after a CUDA synchronisation on the GPU), or with ``--clock cpu`` this
        process's CPU time over all its threads, which a busy shared machine inflates far less."""
        if self.clock == "cpu":
            return time.process_time
        if self.device == "cuda":
            def now() -> float:
                torch.cuda.synchronize()
                return time.perf_counter()

            return now
        return time.perf_counter

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        data = json.loads(text)
        data["vae_channels"] = tuple(data["vae_channels"])
        return cls(**data)


QUICK = dict(heads=2, head_dim=16, depth=3, latent=8, batch_size=2, batches=2, steps=2, repeats=2,
             encoder_image_size=28, vae_channels=(8, 8))  # --quick: sizes; --steps/--repeats still apply


def _turns(samples: dict[str, list[list[float]]], fn: Callable[..., float], *names: str) -> list[list[float]]:
    """Per round, ``fn`` of the steps of ``names`` taken in the same turn of the ring."""
    return [[fn(*xs) for xs in zip(*rounds)] for rounds in zip(*(samples[n] for n in names))]


def _paired(rounds: list[list[float]]) -> dict[str, Any]:
    """The median over all turns and its two-level bootstrap interval."""
    return {"median": statistics.median(x for r in rounds for x in r), "ci95": cluster_bootstrap_ci(rounds)}


def summarize(samples: dict[str, list[list[float]]], peaks: dict[str, dict[str, float]], facts: dict[str, Any],
              s: Settings) -> dict[str, Any]:
    """The JSON document of one family and size: times in ms, ratios to the baseline, intervals, targets."""
    names = [n for n in samples]
    per_round = {n: [statistics.median(r) * 1e3 for r in samples[n]] for n in names}
    ms = {n: {"min": min(v), "median": statistics.median(v), "rounds": v} for n, v in per_round.items()}
    base = ms["baseline"]
    paired = {m: _paired(_turns(samples, lambda x, b: x / b, m, "baseline")) for m in MODES[1:]}
    vs_de = _paired(_turns(samples, lambda u, b, d: (u - b) / d, "uncached", "baseline", "decode_encode"))
    cached_extra = _paired(_turns(samples, lambda c, b: (c - b) * 1e3, "cached", "baseline"))
    peak_key = "cuda_mb" if s.device == "cuda" else "rss_mb"
    targets = {
        "cached": {"limit": TARGETS["cached"], "value": paired["cached"]["median"],
                   "upper": paired["cached"]["ci95"][1]},
        "weight0": {"limit": TARGETS["weight0"], "value": paired["weight0"]["median"],
                    "upper": paired["weight0"]["ci95"][1]},
        "uncached_vs_decode_encode": {"limit": TARGETS["uncached_vs_decode_encode"], "value": vs_de["median"],
                                      "upper": vs_de["ci95"][1]},
    }
    for t in targets.values():
        t["met"] = t["upper"] <= t["limit"]
    lo, hi = paired["weight0"]["ci95"]
    targets["weight0"]["contains_1"] = lo <= 1.0 <= hi
    return {
        "baseline_ms": base["median"],
        "ratio": {m: ms[m]["median"] / base["median"] for m in MODES[1:]},
        "ratio_min": {m: ms[m]["min"] / base["min"] for m in MODES[1:]},
        "ratio_paired": {m: paired[m]["median"] for m in MODES[1:]},
        "ratio_paired_ci95": {m: paired[m]["ci95"] for m in MODES[1:]},
        "decode_encode_ms": ms["decode_encode"]["median"], "align_ms": ms["align"]["median"],
        "cached_extra_ms_paired": cached_extra,
        "uncached_overhead_ms": ms["uncached"]["median"] - base["median"],
        "uncached_overhead_vs_decode_encode_paired": vs_de,
        "repa_host_ms": {m: ms[f"{m}_repa_host"]["median"] for m in MODES[1:]},
        "peak_mb": {m: p[peak_key] for m, p in peaks.items()},
        "peak_rss_mb": {m: p["rss_mb"] for m, p in peaks.items()},
        "ms": ms,
        "steps_ms": {n: [[x * 1e3 for x in r] for r in samples[n]] for n in (*MODES, "decode_encode", "align")},
        "targets": targets, "setup": {**dataclasses.asdict(s), **facts},
    }


def describe(r: dict[str, Any]) -> str:
    st = r["setup"]
    vae = (f"AutoencoderKL {st['vae_factor']}x ({st['vae_decoder_params_m']:.2f} M decoder params)"
           if st["decoder"] == "vae" else "batch pixels")
    return (f"{st['family']} ({st['size']}): {st['denoiser']} {st['denoiser_params_m']:.2f} M params, hidden "
            f"{st['hidden']}, {st['blocks']} blocks, block {st['block_index']} aligned "
            f"({'x'.join(map(str, st['student_grid']))} tokens); batch {st['batch_size']} of "
            f"{st['latent']}x{st['latent']} latents; decoder={st['decoder']}: {vae}; teacher ViT-S/14 (random) at "
            f"{st['encoder_image_size']} px "
            f"({'x'.join(map(str, st['teacher_grid']))} tokens); {st['optimizer']}; {st['device']} {st['precision']}, "
            f"{st['threads'] or 'default'} torch thread(s), {st['clock']} clock; {st['repeats']} rounds x {st['steps']} steps")


def table(r: dict[str, Any]) -> str:
    ms, t = r["ms"], r["targets"]
    lines = [describe(r), f"{'mode':<14} {'median ms':>10} {'x base(min)':>12} {'x base(med)':>12} "
                          f"{'x base(paired) [95% CI]':>26} {'REPA host ms':>13} {'peak MB':>8}  target (CI upper)"]
    for mode in MODES:
        if mode == "baseline":
            cells = ("1", "1", "1", "")
        else:
            ci = r["ratio_paired_ci95"][mode]
            cells = (f"{r['ratio_min'][mode]:.3f}", f"{r['ratio'][mode]:.3f}",
                     f"{r['ratio_paired'][mode]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", f"{r['repa_host_ms'][mode]:.2f}")
        target = t.get(mode)
        mark = f"<= {target['limit']:.2f}  {'ok' if target['met'] else 'MISSED'}" if target else ""
        peak = r["peak_mb"].get(mode)
        lines.append(f"{mode:<14} {ms[mode]['median']:>10.1f} {cells[0]:>12} {cells[1]:>12} {cells[2]:>26} "
                     f"{cells[3]:>13} {'' if peak is None else f'{peak:.0f}':>8}  {mark}")
    for name, label in (("decode_encode", "decode+encode"), ("align", "align alone")):
        lines.append(f"{label:<14} {ms[name]['median']:>10.1f}")
    u = r["uncached_overhead_vs_decode_encode_paired"]
    lines.append(f"uncached overhead = {u['median']:.3f} x decode+encode alone "
                 f"[{u['ci95'][0]:.3f}, {u['ci95'][1]:.3f}] "
                 f"(target <= {TARGETS['uncached_vs_decode_encode']:.2f}: "
                 f"{'ok' if t['uncached_vs_decode_encode']['met'] else 'MISSED'})")
    return "\n".join(lines)


def markdown(document: dict[str, Any]) -> str:
    """The README's overhead table: one row per size and mode, ratios with their intervals."""
    from common import fmt_ci, markdown_table

    rows = []
    for key, r in document["runs"].items():
        st = r["setup"]
        for mode in MODES:
            peak = r["peak_mb"].get(mode)
            if mode == "baseline":
                rows.append([f"{key} ({st['denoiser_params_m']:.1f} M)", mode, f"{r['ms'][mode]['median']:.1f}", "1",
                             "", "" if peak is None else f"{peak:.0f}"])
                continue
            ci = r["ratio_paired_ci95"][mode]
            target = r["targets"].get(mode)
            mark = "" if target is None else f" ({'meets' if target['met'] else 'misses'} <= {target['limit']:.2f})"
            rows.append(["", mode, f"{r['ms'][mode]['median']:.1f}", fmt_ci(r["ratio_paired"][mode], ci) + mark,
                         f"{r['repa_host_ms'][mode]:.1f}", "" if peak is None else f"{peak:.0f}"])
    return markdown_table(["model", "mode", "median step (ms)", "x baseline, paired [95% CI]", "callback host ms",
                           "peak RSS (MB)"], rows)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from lightning_repa.testing import TINY_FAMILIES

    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=[d.family], choices=sorted(TINY_FAMILIES), metavar="FAMILY")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="model sizes (default: both)")
    p.add_argument("--block-index", type=int, default=None, help="aligned block (default: 8/28 of the depth)")
    p.add_argument("--latent", type=int, default=d.latent)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--batches", type=int, default=d.batches, help="batches per epoch; the first epoch is not timed")
    p.add_argument("--steps", type=int, help=f"timed steps per fit (default {d.steps}; --quick {QUICK['steps']})")
    p.add_argument("--repeats", type=int,
                   help=f"rounds over the modes (default {d.repeats}; --quick {QUICK['repeats']})")
    p.add_argument("--encoder-image-size", type=int, default=d.encoder_image_size)
    p.add_argument("--decoder", choices=("vae", "pixels"), default=d.decoder)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer)
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--precision", default=None,
                   help="Lightning precision (default: 32-true on CPU, bf16-mixed on CUDA)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default=d.clock)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--no-cache-rates", action="store_true", help="skip the lightning-repa-cache fill/read rates")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: a smoke test, not a measurement")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write the table (markdown) here")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)")
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu measures host CPU time; on CUDA use the wall clock")
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    return args


def settings_for(args: argparse.Namespace, family: str, size: str) -> Settings:
    s = Settings(family=family, size=size, **SIZES[size], block_index=args.block_index, latent=args.latent,
                 batch_size=args.batch_size, batches=args.batches, encoder_image_size=args.encoder_image_size,
                 decoder=args.decoder, optimizer=args.optimizer, device=args.device, precision=args.precision,
                 threads=args.threads, clock=args.clock, memory=not args.no_memory)
    if args.quick:
        s = dataclasses.replace(s, **{**QUICK, "heads": QUICK["heads"] * (2 if size == "4x" else 1)})
    return dataclasses.replace(s, steps=args.steps or s.steps, repeats=args.repeats or s.repeats)


def run_one(s: Settings, checkpoint: str) -> dict[str, Any]:
    from overhead_fits import measure, peak_memory

    print(f"measuring {s.family} {s.size} ({s.repeats} rounds)...", file=sys.stderr, flush=True)
    samples, facts = measure(s, checkpoint, lambda line: print(line, file=sys.stderr, flush=True))
    result = summarize(samples, peak_memory(s, checkpoint) if s.memory else {}, facts, s)
    print(table(result), flush=True)
    return result


def write_checkpoint(directory: str) -> str:
    """A DINOv2 ViT-S/14 with random weights, in timm's format at 518 px, in ``directory``."""
    import os

    import timm

    path = os.path.join(directory, CHECKPOINT_NAME)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    torch.save(model.state_dict(), path)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    from overhead_fits import bench_family

    settings = [settings_for(args, f, z) for f in args.families for z in args.sizes]
    for s in settings:
        bench_family(s)  # an unknown family or a bad size fails here, before anything runs
    with tempfile.TemporaryDirectory(prefix="repa_overhead_") as tmp:
        checkpoint = write_checkpoint(tmp)
        results = {f"{s.family}/{s.size}": run_one(s, checkpoint) for s in settings}
        rates = None
        if not args.no_cache_rates:
            from cache_rates import cache_rates

            rates = cache_rates(checkpoint, args.threads or 1, quick=args.quick)
    command = " ".join(["python", "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)])
    document = {"runs": results, "cache_rates": rates, "targets": TARGETS, "meta": machine(), "command": command}
    if args.json:
        print(f"wrote {write_json(args.json, document)}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(document) + "\n")
    missed = [f"{k}: {name}" for k, r in results.items() for name, t in r["targets"].items() if not t["met"]]
    if missed:
        print("targets missed (95 % upper bound over the limit): " + "; ".join(missed))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
