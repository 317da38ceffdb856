"""What REPA costs per optimizer step: the same DiT trained without the callback (baseline), with
REPA uncached, with REPA cached (`cache="memory"`, warm) and at weight 0 (`lam=0`), on one machine in
one run, each mode reported as a ratio to the baseline, with its peak memory.

Each mode is a `trainer.fit` of a fresh copy of the same denoiser on the same batches, and the time
from `on_train_batch_start` to `on_train_batch_end` (forward, REPA, backward, optimizer step,
logging) of every step after the first epoch (which fills the cache and warms every mode alike) is
recorded. The fits of a round run side by side in threads that take turns step by step (only one
runs at a time), so any few seconds hold one step of each mode and a busy machine's drift hits them
alike; `--repeats` rounds rotate the order. Reported per mode: the min and the median over rounds
of each fit's median step, their ratios to the baseline's, and the median over steps of the ratio to
the baseline's step of the same turn ("pair"); the host time spent inside the callback per step
("REPA host ms": its `training_step` wrapper and hooks; steady where whole steps are noisy); and
the peak memory of a fresh process per mode (RSS; on CUDA the peak allocated memory). Two probes
take turns in the same rounds: decode + encode alone (`callback.teacher(batch, latents, None)`, the
decoder and encoder an uncached step runs, on the same batches) and the alignment alone (projector
+ objective, forward and backward: the floor of a cached step).

The denoiser is the diffusers class of `--family` (default PixArt-alpha's), widened and deepened from
`lightning_repa.testing.tiny_models` (default hidden 128, 8 blocks, 2.3 M parameters: tens of ms a step on
two CPU cores; families without a size rule run at their tiny size), the VAE a small diffusers
`AutoencoderKL` with the 8x downsampling of the real ones at `module.vae` (`decoder="vae"`), the
teacher DINOv2 ViT-S/14 with random weights, written to a temporary directory that is removed.
Targets (CPU), judged on the paired ratios: cached <= 1.05x baseline, weight 0 <= 1.01x, uncached
overhead <= 1.10x decode + encode alone; `--check` exits with status 1 when one is missed. On a
shared machine, `--threads 1 --clock cpu` (this process's CPU time) steadies the numbers.

    python benchmarks/overhead.py                          # PixArt, prints the table
    python benchmarks/overhead.py --json overhead.json     # and writes the results
    python benchmarks/overhead.py --families pixart sd3 flux dit --repeats 7
    python benchmarks/overhead.py --threads 1 --clock cpu  # a busy machine
    python benchmarks/overhead.py --quick --json out.json  # tiny sizes, 2 rounds: a smoke test (the test)

Writes nothing but `--json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package (also when not installed) and tests/helpers

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from helpers import LatentData, TinyFlow  # noqa: E402
from lightning_repa import RepaCallback  # noqa: E402
from lightning_repa.families import get_family  # noqa: E402
from lightning_repa.testing.tiny_models import TINY_FAMILIES, TinyFamily  # noqa: E402

MODES = ("baseline", "uncached", "cached", "weight0")  # each a trainer.fit
PROBES = ("decode_encode", "align")  # timed alone, outside the training loop
TARGETS = {"cached": 1.05, "weight0": 1.01, "uncached_vs_decode_encode": 1.10}
CHECKPOINT_NAME = "dinov2_vits14_random.pth"


# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything a run depends on; passed as JSON to the peak-memory worker processes."""

    family: str = "pixart"
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
        if self.block_index is not None:
            return self.block_index
        return max(1, round(self.depth * 8 / 28)) if self.family in SCALERS else 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        data = json.loads(text)
        data["vae_channels"] = tuple(data["vae_channels"])
        return cls(**data)


QUICK = dict(heads=2, head_dim=16, depth=3, latent=8, batch_size=2, batches=2, steps=2, repeats=2,
             encoder_image_size=28, vae_channels=(8, 8))  # --quick: sizes; --steps/--repeats still apply


def _flux_rope(head_dim: int) -> tuple[int, int, int]:
    if head_dim % 16:
        raise ValueError(f"flux: --head-dim must be a multiple of 16 (rope axes), got {head_dim}")
    return head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8


# config overrides that widen and deepen a tiny family; other families run at their tiny size
SCALERS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "pixart": lambda s: dict(num_attention_heads=s.heads, attention_head_dim=s.head_dim, num_layers=s.depth,
                             cross_attention_dim=s.hidden, sample_size=s.latent),
    "dit": lambda s: dict(num_attention_heads=s.heads, attention_head_dim=s.head_dim, num_layers=s.depth,
                          sample_size=s.latent),
    "sd3": lambda s: dict(num_attention_heads=s.heads, attention_head_dim=s.head_dim, num_layers=s.depth,
                          caption_projection_dim=s.hidden, sample_size=s.latent,
                          pos_embed_max_size=max(16, s.latent // 2)),
    "flux": lambda s: dict(num_attention_heads=s.heads, attention_head_dim=s.head_dim, num_layers=s.depth // 2,
                           num_single_layers=s.depth - s.depth // 2, axes_dims_rope=_flux_rope(s.head_dim)),
}


def bench_family(s: Settings) -> TinyFamily:
    """The tiny family of `s.family`, widened and deepened when a scaler is known for it."""
    if s.family not in TINY_FAMILIES:
        raise ValueError(f"unknown --family {s.family!r}; known: {', '.join(sorted(TINY_FAMILIES))}")
    fam = TINY_FAMILIES[s.family]
    if s.family not in SCALERS:
        return fam
    return dataclasses.replace(fam, config={**fam.config, **SCALERS[s.family](s)})


def effective_decoder(s: Settings) -> str:
    """`vae` needs KL latents (what a diffusers AutoencoderKL decodes); other families read pixels."""
    return s.decoder if get_family(s.family).latent_format == "kl" else "pixels"


def clock(s: Settings) -> Callable[[], float]:
    """The clock of the run: wall time (`perf_counter`, after a CUDA synchronisation on the GPU), or
    with `--clock cpu` this process's CPU time over all its threads (`process_time`), which a busy
    shared machine inflates far less; use it with `--threads 1` (idle threads spinning count too)."""
    if s.clock == "cpu":
        return time.process_time
    if s.device == "cuda":
        def now() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return now
    return time.perf_counter


# ----------------------------------------------------------------------------- module and data


def build_vae(s: Settings, latent_channels: int) -> nn.Module:
    """A small frozen AutoencoderKL (latents -> images `vae_factor` times larger), seeded."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        levels = len(s.vae_channels)
        vae = AutoencoderKL(
            block_out_channels=s.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, latent_channels=latent_channels,
            norm_num_groups=min(s.vae_channels), sample_size=s.latent * s.vae_factor, scaling_factor=0.18215,
        )
    return vae.eval().requires_grad_(False)


class _OnDevice:
    """A TinyFamily whose conditioning (built on the CPU) follows the module to its device."""

    def __init__(self, fam: TinyFamily, module: L.LightningModule) -> None:
        self._fam, self._module = fam, module

    def make_cond(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        cond = self._fam.make_cond(batch_size, seed=seed)
        return {k: v.to(self._module.device) for k, v in cond.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fam, name)


class BenchFlow(TinyFlow):
    """`helpers.TinyFlow` on the benchmark's denoiser, with the VAE at `vae` (frozen, outside the
    optimizer) and the optimizer over the trainable parameters (the denoiser and the projector)."""

    def __init__(self, s: Settings) -> None:
        super().__init__(s.family, lr=s.lr, optimizer=s.optimizer)
        fam = bench_family(s)
        self.transformer = fam.build(0)
        self.fam = _OnDevice(fam, self)
        self.vae = build_vae(s, fam.latent_channels) if effective_decoder(s) == "vae" else None
        self.now = clock(s)
        self.own_time = 0.0  # of the last training_step, without what REPA wraps around it

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        t0 = self.now()
        loss = super().training_step(batch, batch_idx)
        self.own_time = self.now() - t0
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr)


class _Items(Dataset):
    """`helpers.LatentData` items, without the pixels when the teacher decodes the latents."""

    def __init__(self, data: LatentData, pixels: bool) -> None:
        self.data, self.pixels = data, pixels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.data[i]
        return item if self.pixels else {k: v for k, v in item.items() if k != "pixels"}


def make_loader(s: Settings) -> DataLoader:
    """`batches` fixed batches of `batch_size` samples (ids 0..n-1), the same for every mode."""
    side = s.latent * s.vae_factor
    data = LatentData(s.family, n=s.batches * s.batch_size, hw=(s.latent, s.latent), image_hw=(side, side))
    return DataLoader(_Items(data, effective_decoder(s) == "pixels"), batch_size=s.batch_size, shuffle=False)


# ----------------------------------------------------------------------------- one fit


class StepTimer(L.Callback):
    """Per training batch (one optimizer step), after the first `skip`: the time from
    `on_train_batch_start` to `on_train_batch_end` (put this callback last; `turn()`, if given, is
    called first: there the fit waits for its turn), and the host time REPA adds around the module's
    own work: its `training_step` wrapper less the module's `training_step` (`BenchFlow.own_time`),
    plus the callback's `on_before_optimizer_step` and `on_train_batch_end`. That leaves out the
    projector's backward and optimizer update (see the `align` probe)."""

    def __init__(self, skip: int, now: Callable[[], float], repa: Optional[RepaCallback] = None,
                 turn: Optional[Callable[[], None]] = None) -> None:
        self.skip, self.now, self.turn = skip, now, turn
        self.times: list[float] = []
        self.repa_times: list[float] = []
        self._seen, self._t0, self._repa = 0, 0.0, 0.0
        if repa is not None:
            for hook in ("on_before_optimizer_step", "on_train_batch_end"):
                setattr(repa, hook, self._timing(getattr(repa, hook)))

    def _timing(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._repa += self.now() - t0

        return timed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = pl_module.training_step  # REPA's wrapper (an instance attribute), or the module's own

        def training_step(*args: Any, **kwargs: Any) -> Any:
            t0 = self.now()
            try:
                return step(*args, **kwargs)
            finally:
                self._repa += self.now() - t0 - pl_module.own_time

        pl_module.training_step = training_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.turn is not None:
            self.turn()
        self._repa = 0.0
        self._t0 = self.now()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        elapsed = self.now() - self._t0
        if self._seen >= self.skip:
            self.times.append(elapsed)
            self.repa_times.append(self._repa)
        self._seen += 1


_ENCODERS: dict[tuple[str, int], nn.Module] = {}


class BenchRepa(RepaCallback):
    """RepaCallback that builds the (frozen, stateless) encoder once per process and checkpoint, so
    that a fit does not reread it: only the per-step cost is measured, never the set-up."""

    def build_encoder(self) -> nn.Module:
        key = (str(self.config.encoder_checkpoint), self.config.encoder_image_size)
        if key not in _ENCODERS:
            _ENCODERS[key] = super().build_encoder()
        return _ENCODERS[key]


def repa_callback(mode: str, s: Settings, checkpoint: str) -> Optional[RepaCallback]:
    """The callback of `mode`: none (baseline), uncached, cached (memory), or at weight 0 (lam=0)."""
    if mode == "baseline":
        return None
    options = dict(family=s.family, block_index=s.aligned_block(), encoder="dinov2_vits14",
                   encoder_checkpoint=checkpoint, encoder_image_size=s.encoder_image_size,
                   decoder=effective_decoder(s))
    if mode == "cached":
        options["cache"] = "memory"
    if mode == "weight0":
        options["lam"] = 0.0
    return BenchRepa(**options)


@dataclass
class Fit:
    """One fit of one mode: the timed step times (s), the callback and the module it trained."""

    mode: str
    times: list[float]
    repa_times: list[float]  # host time REPA added to each step (StepTimer)
    repa: Optional[RepaCallback]
    module: BenchFlow


def run_fit(mode: str, s: Settings, checkpoint: str, steps: Optional[int] = None,
            turn: Optional[Callable[[], None]] = None) -> Fit:
    """`trainer.fit` of a fresh module in `mode`: one untimed epoch, then `steps` timed steps;
    `turn()` is called before each step (`take_turns`)."""
    gc.collect()
    repa = repa_callback(mode, s, checkpoint)
    timer = StepTimer(skip=s.batches, now=clock(s), repa=repa, turn=turn)
    module = BenchFlow(s)
    trainer = L.Trainer(
        max_steps=s.batches + (s.steps if steps is None else steps), accelerator="gpu" if s.device == "cuda" else "cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=([repa] if repa else []) + [timer],
    )
    trainer.fit(module, make_loader(s))
    if mode == "cached" and getattr(repa.teacher, "misses", None) != s.batches * s.batch_size:
        raise RuntimeError(f"the cache missed {getattr(repa.teacher, 'misses', None)} samples, expected one per sample")
    return Fit(mode, timer.times, timer.repa_times, repa, module)


# ----------------------------------------------------------------------------- probes


def device_batches(s: Settings) -> list[dict[str, Any]]:
    """The training batches, on the device."""
    return [{k: v.to(s.device) for k, v in batch.items()} for batch in make_loader(s)]


def decode_encode_work(fit: Fit) -> Callable[[dict[str, Any]], Any]:
    """A batch through the uncached teacher the callback built (decode + encode, no grad)."""
    teacher = fit.repa.teacher
    return lambda batch: teacher(batch, batch["latents"], None)


def align_work(fit: Fit, batches: list[dict[str, Any]], s: Settings) -> Callable[[dict[str, Any]], Any]:
    """Projector + objective, forward and backward, on random student tokens of the captured shape and
    the teacher tokens of the batch: what a cached step adds at the least."""
    repa, module = fit.repa, fit.module
    projector = getattr(module, repa.projector_attr)
    grid_s = tuple(repa.family.grid(batches[0]["latents"].shape, module.transformer))
    hidden = repa.family.hidden_size(module.transformer)
    targets = {id(b): repa.teacher(b, b["latents"], None) for b in batches}  # (tokens, grid)

    def step(batch: dict[str, Any]) -> None:
        tokens, grid_t = targets[id(batch)]
        student = torch.randn(tokens.shape[0], math.prod(grid_s), hidden, device=s.device, requires_grad=True)
        repa.objective(student, grid_s, tokens, grid_t, projector).loss.backward()

    return step


def probe_loop(work: Callable[[dict[str, Any]], Any], batches: list[dict[str, Any]], s: Settings,
               turn: Callable[[], None]) -> list[float]:
    """`work` on the batches in training order, one call a turn, as many turns as a fit takes steps;
    the times of the calls after the first epoch."""
    now, times = clock(s), []
    for i in range(s.batches + s.steps):
        turn()
        t0 = now()
        work(batches[i % len(batches)])
        if i >= s.batches:
            times.append(now() - t0)
    return times


# ----------------------------------------------------------------------------- rounds


class Baton:
    """Threads that take turns in a fixed ring: only the holder runs, the others wait (without the
    GIL), so the modes' steps interleave one by one and never overlap."""

    def __init__(self, names: list[str]) -> None:
        self._ring, self._holder = list(names), names[0]
        self._cv = threading.Condition()

    def wait(self, name: str) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._holder == name)

    def turn(self, name: str) -> None:
        """Hand the baton to the next in the ring and wait until it comes back."""
        with self._cv:
            self._holder = self._after(name)
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._holder == name)

    def leave(self, name: str) -> None:
        with self._cv:
            following = self._after(name)
            self._ring.remove(name)
            if self._holder == name:
                self._holder = following if self._ring else None
            self._cv.notify_all()

    def _after(self, name: str) -> str:
        return self._ring[(self._ring.index(name) + 1) % len(self._ring)]


def take_turns(work: dict[str, Callable[[Callable[[], None]], Any]]) -> dict[str, Any]:
    """Run each `work[name](turn)` in its own thread, in turns (in the dict's order), and return their
    results; `turn()` is where one hands over. The first error is raised once all have finished."""
    baton = Baton(list(work))
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def participant(name: str) -> None:
        baton.wait(name)
        try:
            results[name] = work[name](lambda: baton.turn(name))
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the main thread
            errors.append(error)
        finally:
            baton.leave(name)

    threads = [threading.Thread(target=participant, args=(name,), name=f"overhead-{name}", daemon=True)
               for name in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def setup_facts(fit: "Fit", batch: dict[str, Any], s: Settings) -> dict[str, Any]:
    """What was measured, read off the built objects: the denoiser (class, size, blocks, width),
    the aligned block and the token grids, the decoder and the VAE decoder's size."""
    denoiser, vae, family = fit.module.transformer, fit.module.vae, fit.repa.family
    return {
        "denoiser": type(denoiser).__name__,
        "denoiser_params_m": sum(p.numel() for p in denoiser.parameters()) / 1e6,
        "blocks": len(family.block_modules(denoiser)),
        "hidden": family.hidden_size(denoiser),
        "block_index": fit.repa.block_index,
        "student_grid": list(family.grid(batch["latents"].shape, denoiser)),
        "teacher_grid": list(fit.repa.teacher(batch, batch["latents"], None)[1]),
        "decoder": effective_decoder(s),
        "vae_decoder_params_m": 0.0 if vae is None else sum(p.numel() for p in vae.decoder.parameters()) / 1e6,
        "vae_factor": s.vae_factor,
    }


def fit_work(mode: str, s: Settings, checkpoint: str, turn: Callable[[], None]) -> Fit:
    """A fit of `mode` that hands over at every step (a `take_turns` work item)."""
    return run_fit(mode, s, checkpoint, turn=turn)


def rotated(items: tuple[str, ...], k: int) -> list[str]:
    k %= len(items)
    return list(items[k:] + items[:k])


def measure(s: Settings, checkpoint: str, log: Callable[[str], None]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """`repeats` rounds; in a round every mode's fit and both probes run side by side in threads that
    take turns step by step (the order of the ring rotated from round to round), so each stretch of a
    few steps holds one step of each. Returns, in s, per round: each mode's median step time and
    median REPA host time (`<mode>_repa_host`) and each probe's median; all the steps of every mode
    and probe (`<name>_steps`, aligned: step i of every mode ran in the same turn of the ring); and
    facts about the setup (sizes, cache counts)."""
    batches = device_batches(s)
    reference = run_fit("uncached", s, checkpoint, steps=1)  # warms the process; its teacher is probed
    facts = setup_facts(reference, batches[0], s)
    probes = {"decode_encode": decode_encode_work(reference), "align": align_work(reference, batches, s)}
    samples: dict[str, list[float]] = {}
    for r in range(s.repeats):
        work: dict[str, Callable[[Callable[[], None]], Any]] = {}
        for name in rotated(MODES + PROBES, r):
            if name in probes:
                work[name] = functools.partial(probe_loop, probes[name], batches, s)
            else:
                work[name] = functools.partial(fit_work, name, s, checkpoint)
        done = take_turns(work)
        for name in MODES + PROBES:
            times = done[name] if name in probes else done[name].times
            samples.setdefault(name, []).append(statistics.median(times))
            samples.setdefault(f"{name}_steps", []).extend(times)
        for mode in MODES:
            samples.setdefault(f"{mode}_repa_host", []).append(statistics.median(done[mode].repa_times))
        cache = done["cached"].repa.teacher
        facts["cache"] = {"hits": cache.hits, "misses": cache.misses}
        log(f"  round {r + 1}/{s.repeats}: " + ", ".join(f"{n} {samples[n][-1] * 1e3:.1f}" for n in MODES + PROBES)
            + " ms")
    return samples, facts


# ----------------------------------------------------------------------------- peak memory


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB: Linux's VmHWM (`ru_maxrss` would keep the peak of
    the parent it was forked from, across exec), else `ru_maxrss` (KiB; bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def memory_worker(mode: str, settings: str, checkpoint: str) -> dict[str, float]:
    """In a fresh process: one fit of `mode` (the cache-filling epoch and two steps), and its peaks."""
    quiet()
    s = Settings.from_json(settings)
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_fit(mode, s, checkpoint, steps=2)
    peaks = {"rss_mb": peak_rss_mb()}
    if s.device == "cuda":
        peaks["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def peak_memory(s: Settings, checkpoint: str) -> dict[str, dict[str, float]]:
    """Peaks of a fresh process per mode, side by side (peaks do not add up). The processes are forked
    from a fork server that has imported torch, Lightning, diffusers and timm and done nothing else,
    so a peak is what a training script's would be, without the import time of a process each."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["__main__", "torch", "lightning", "diffusers", "timm", "lightning_repa", "helpers"])
    pools = {mode: ctx.Pool(1, maxtasksperchild=1) for mode in MODES}
    try:
        jobs = {mode: pool.apply_async(memory_worker, (mode, s.to_json(), checkpoint)) for mode, pool in pools.items()}
        return {mode: job.get() for mode, job in jobs.items()}
    finally:
        for pool in pools.values():
            pool.close()
            pool.join()


# ----------------------------------------------------------------------------- results


def paired(samples: dict[str, list[float]], fn: Callable[..., float], *names: str) -> float:
    """The median over steps of `fn(step of names[0], step of names[1], ...)`, steps taken in the same
    turn of the ring (drift of the machine cancels)."""
    return statistics.median(fn(*xs) for xs in zip(*(samples[f"{n}_steps"] for n in names)))


def summarize(samples: dict[str, list[float]], peaks: dict[str, dict[str, float]], facts: dict[str, Any],
              s: Settings) -> dict[str, Any]:
    """The JSON document of one family: times in ms, ratios to the baseline, targets."""
    names = [*MODES, *PROBES, *(f"{m}_repa_host" for m in MODES)]
    ms = {n: {"min": min(samples[n]) * 1e3, "median": statistics.median(samples[n]) * 1e3,
              "rounds": [x * 1e3 for x in samples[n]]} for n in names}
    base = ms["baseline"]
    ratio = {m: ms[m]["median"] / base["median"] for m in MODES[1:]}
    ratio_min = {m: ms[m]["min"] / base["min"] for m in MODES[1:]}
    ratio_paired = {m: paired(samples, lambda x, b: x / b, m, "baseline") for m in MODES[1:]}
    overhead = ms["uncached"]["median"] - base["median"]
    vs_decode_encode = overhead / ms["decode_encode"]["median"]
    result_paired_overhead = paired(samples, lambda u, b, d: (u - b) / d, "uncached", "baseline", "decode_encode")
    peak_key = "cuda_mb" if s.device == "cuda" else "rss_mb"
    result = {
        "baseline_ms": base["median"],
        "ratio": ratio,
        "ratio_min": ratio_min,
        "ratio_paired": ratio_paired,
        "decode_encode_ms": ms["decode_encode"]["median"],
        "align_ms": ms["align"]["median"],
        "uncached_overhead_ms": overhead,
        "uncached_overhead_vs_decode_encode": vs_decode_encode,
        "uncached_overhead_vs_decode_encode_paired": result_paired_overhead,
        "repa_host_ms": {m: ms[f"{m}_repa_host"]["median"] for m in MODES[1:]},
        "peak_mb": {m: p[peak_key] for m, p in peaks.items()},
        "peak_rss_mb": {m: p["rss_mb"] for m, p in peaks.items()},
        "ms": ms,
        "steps_ms": {n: [x * 1e3 for x in samples[f"{n}_steps"]] for n in (*MODES, *PROBES)},
        "targets": {  # judged on the paired ratios: the steadiest on a busy machine
            "cached": {"limit": TARGETS["cached"], "value": ratio_paired["cached"]},
            "weight0": {"limit": TARGETS["weight0"], "value": ratio_paired["weight0"]},
            "uncached_vs_decode_encode": {"limit": TARGETS["uncached_vs_decode_encode"],
                                          "value": result_paired_overhead},
        },
        "setup": {**dataclasses.asdict(s), **facts},
    }
    for target in result["targets"].values():
        target["met"] = target["value"] <= target["limit"]
    return result


def describe(r: dict[str, Any]) -> str:
    """One line on what was measured."""
    st = r["setup"]
    vae = (f"AutoencoderKL {st['vae_factor']}x "
           f"({st['vae_decoder_params_m']:.2f} M decoder params)" if st["decoder"] == "vae" else "batch pixels")
    return (f"{st['family']}: {st['denoiser']} {st['denoiser_params_m']:.2f} M params, hidden {st['hidden']}, "
            f"{st['blocks']} blocks, block {st['block_index']} aligned ({'x'.join(map(str, st['student_grid']))} "
            f"tokens); batch {st['batch_size']} of {st['latent']}x{st['latent']} latents; decoder={st['decoder']}: "
            f"{vae}; teacher ViT-S/14 (random) at {st['encoder_image_size']} px "
            f"({'x'.join(map(str, st['teacher_grid']))} tokens); {st['optimizer']}; {st['device']}, "
            f"{torch.get_num_threads()} threads, {st['clock']} clock; {st['repeats']} rounds x {st['steps']} steps")


def table(r: dict[str, Any]) -> str:
    """The printed table of one family."""
    ms, t = r["ms"], r["targets"]
    lines = [describe(r), f"{'mode':<14} {'min ms':>8} {'median ms':>10} {'x base(min)':>12} {'x base(med)':>12} "
                          f"{'x base(pair)':>13} {'REPA host ms':>13} {'peak MB':>8}  target (x base(pair))"]
    for mode in MODES:
        rmin, rmed, rpair = (1.0, 1.0, 1.0) if mode == "baseline" else (
            r["ratio_min"][mode], r["ratio"][mode], r["ratio_paired"][mode])
        host = "" if mode == "baseline" else f"{r['repa_host_ms'][mode]:.2f}"
        target = t.get(mode)
        mark = f"<= {target['limit']:.2f}  {'ok' if target['met'] else 'MISSED'}" if target else ""
        peak = r["peak_mb"].get(mode)
        lines.append(f"{mode:<14} {ms[mode]['min']:>8.1f} {ms[mode]['median']:>10.1f} {rmin:>12.3f} {rmed:>12.3f} "
                     f"{rpair:>13.3f} {host:>13} {'' if peak is None else f'{peak:.0f}':>8}  {mark}")
    for name, label in (("decode_encode", "decode+encode"), ("align", "align alone")):
        lines.append(f"{label:<14} {ms[name]['min']:>8.1f} {ms[name]['median']:>10.1f}")
    u = t["uncached_vs_decode_encode"]
    lines.append(f"uncached overhead {r['uncached_overhead_ms']:.1f} ms = "
                 f"{r['uncached_overhead_vs_decode_encode']:.3f} x decode+encode alone (paired {u['value']:.3f}: "
                 f"target <= {u['limit']:.2f}: {'ok' if u['met'] else 'MISSED'})")
    lines.append("x base: of the min / median over rounds of each fit's median step, and (pair) the median over "
                 "steps of step / the baseline's step of the same turn (the targets' measure). REPA host ms: time "
                 "inside the callback per step (its training_step wrapper and hooks). align alone: projector + "
                 "objective, forward and backward")
    return "\n".join(lines)


def meta() -> dict[str, Any]:
    import diffusers
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__,
            "diffusers": diffusers.__version__, "timm": timm.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------- main


def write_checkpoint(directory: str) -> str:
    """A DINOv2 ViT-S/14 with random weights, in timm's format at 518 px, in `directory`."""
    import timm

    path = os.path.join(directory, CHECKPOINT_NAME)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    torch.save(model.state_dict(), path)
    return path


def quiet() -> None:
    """Keep the output to the table: no Lightning banners, no data-loader hints."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*has `shuffle=True`.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning's own use of torch's pytree
    warnings.filterwarnings("ignore", message="Accessing config attribute `latents_")  # decoders.py, see README


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default=d.family, choices=sorted(TINY_FAMILIES), metavar="FAMILY",
                   help="the denoiser's family (default %(default)s)")
    p.add_argument("--families", nargs="+", choices=sorted(TINY_FAMILIES), metavar="FAMILY",
                   help="several families, one after the other (the first is the top level of the JSON, all are "
                        "under `families`)")
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--depth", type=int, default=d.depth, help="transformer blocks")
    p.add_argument("--block-index", type=int, default=None, help="aligned block (default: 8/28 of the depth)")
    p.add_argument("--latent", type=int, default=d.latent, help="latent side (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--batches", type=int, default=d.batches, help="batches per epoch; the first epoch is not timed")
    p.add_argument("--steps", type=int,
                   help=f"timed optimizer steps per fit (default {d.steps}; --quick {QUICK['steps']})")
    p.add_argument("--repeats", type=int,
                   help=f"rounds over the modes (default {d.repeats}; --quick {QUICK['repeats']})")
    p.add_argument("--encoder-image-size", type=int, default=d.encoder_image_size)
    p.add_argument("--decoder", choices=("vae", "pixels"), default=d.decoder)
    p.add_argument("--vae-channels", type=int, nargs="+", default=list(d.vae_channels))
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer)
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default=d.clock,
                   help="wall time, or this process's CPU time (steadier on a shared machine; with --threads 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: a smoke test, not a measurement")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    return p.parse_args(argv)


def settings_for(args: argparse.Namespace, family: str) -> Settings:
    """The Settings of one family from the command line (`--quick` replaces the sizes)."""
    s = Settings(family=family, heads=args.heads, head_dim=args.head_dim, depth=args.depth,
                 block_index=args.block_index, latent=args.latent, batch_size=args.batch_size, batches=args.batches,
                 encoder_image_size=args.encoder_image_size, decoder=args.decoder,
                 vae_channels=tuple(args.vae_channels), optimizer=args.optimizer, device=args.device,
                 threads=args.threads, clock=args.clock, memory=not args.no_memory)
    if args.quick:
        s = dataclasses.replace(s, **QUICK)
    s = dataclasses.replace(s, steps=args.steps or s.steps, repeats=args.repeats or s.repeats)
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if s.device == "cuda" and s.clock == "cpu":
        raise SystemExit("--clock cpu measures host CPU time; on CUDA use the wall clock")
    return s


def busy_note() -> Optional[str]:
    """A warning when other processes load the machine (the load average exceeds the CPUs)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cpus:
        return None
    return (f"note: load average {load:.1f} on {cpus} CPUs: other processes compete for the cores, so times are "
            "noisy (with several torch threads, badly); --threads 1 --clock cpu and more --repeats steady them")


def run_family(s: Settings, checkpoint: str) -> dict[str, Any]:
    """Measure one family and print its table."""
    print(f"measuring {s.family} ({s.repeats} rounds)...", file=sys.stderr, flush=True)
    samples, facts = measure(s, checkpoint, lambda line: print(line, file=sys.stderr, flush=True))
    peaks = peak_memory(s, checkpoint) if s.memory else {}
    result = summarize(samples, peaks, facts, s)
    print(table(result), flush=True)
    note = busy_note()
    if note:
        print(note, flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    families = args.families or [args.family]
    settings = [settings_for(args, family) for family in families]
    for s in settings:
        bench_family(s)  # an unknown family or a bad size fails here, before anything runs
    with tempfile.TemporaryDirectory(prefix="repa_overhead_") as tmp:
        checkpoint = write_checkpoint(tmp)
        results = {s.family: run_family(s, checkpoint) for s in settings}
    command = " ".join(["python", "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)])
    document = {**results[families[0]], "families": results, "meta": meta(), "command": command}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2))
        print(f"wrote {args.json}")
    missed = [f"{f}: {k}" for f, r in results.items() for k, t in r["targets"].items() if not t["met"]]
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
