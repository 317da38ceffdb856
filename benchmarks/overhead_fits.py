"""The timed work of ``overhead.py``: the benchmark's module and data, one ``trainer.fit`` per mode with
a step timer, the two probes timed alone (decode + encode, and the alignment), the rounds in which
they all take turns, and the peak memory of a fresh process per mode.

The module is ``lightning_repa.testing.TinyFlow`` on a widened and deepened tiny denoiser, with a
small frozen diffusers ``AutoencoderKL`` at ``vae``; the teacher is DINOv2 ViT-S/14 with random
weights (``lightning_repa.encoders.load_encoder``), written to a temporary directory.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import multiprocessing as mp
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from common import peak_rss_mb, quiet, take_turns
from lightning_repa import FAMILIES, RepaCallback
from lightning_repa.testing import TINY_FAMILIES, LatentData, TinyFamily, TinyFlow

MODES = ("baseline", "uncached", "cached", "weight0")  # each a trainer.fit
PROBES = ("decode_encode", "align")  # timed alone, outside the training loop
ENCODER = "dinov2_vits14"


def _flux_rope(head_dim: int) -> tuple[int, int, int]:
    if head_dim % 16:
        raise ValueError(f"flux: --head-dim must be a multiple of 16 (rope axes), got {head_dim}")
    return head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8


# config overrides that widen and deepen a tiny family; other families run at their tiny size
SCALERS: dict[str, Callable[[Any], dict[str, Any]]] = {
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


def bench_family(s: Any) -> TinyFamily:
    """The tiny family of ``s.family``, widened and deepened when a scaler is known for it."""
    if s.family not in TINY_FAMILIES:
        raise ValueError(f"unknown --family {s.family!r}; known: {', '.join(sorted(TINY_FAMILIES))}")
    fam = TINY_FAMILIES[s.family]
    if s.family not in SCALERS:
        return fam
    return dataclasses.replace(fam, config={**fam.config, **SCALERS[s.family](s)})


def effective_decoder(s: Any) -> str:
    """``vae`` needs KL latents (what a diffusers AutoencoderKL decodes); other families read pixels."""
    return s.decoder if FAMILIES[s.family].latent_format == "kl" else "pixels"


def build_vae(s: Any, latent_channels: int) -> nn.Module:
    """A small frozen AutoencoderKL (latents -> images ``vae_factor`` times larger), seeded."""
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
        return {k: v.to(self._module.device) for k, v in self._fam.make_cond(batch_size, seed=seed).items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fam, name)


class BenchFlow(TinyFlow):
    """``TinyFlow`` on the benchmark's denoiser, with the VAE at ``vae`` (frozen, outside the optimizer)
    and the optimizer over the trainable parameters (the denoiser and the projector)."""

    def __init__(self, s: Any) -> None:
        super().__init__(s.family, lr=s.lr, optimizer=s.optimizer)
        fam = bench_family(s)
        self.transformer = fam.build(0)
        self.fam = _OnDevice(fam, self)
        self.vae = build_vae(s, fam.latent_channels) if effective_decoder(s) == "vae" else None
        self.now = s.now()
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
    """``LatentData`` items, without the pixels when the teacher decodes the latents."""

    def __init__(self, data: LatentData, pixels: bool) -> None:
        self.data, self.pixels = data, pixels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.data[i]
        return item if self.pixels else {k: v for k, v in item.items() if k != "pixels"}


def make_loader(s: Any) -> DataLoader:
    """``batches`` fixed batches of ``batch_size`` samples (ids 0..n-1), the same for every mode."""
    side = s.latent * s.vae_factor
    data = LatentData(s.family, n=s.batches * s.batch_size, hw=(s.latent, s.latent), image_hw=(side, side))
    return DataLoader(_Items(data, effective_decoder(s) == "pixels"), batch_size=s.batch_size, shuffle=False)


class StepTimer(L.Callback):
    """Per training batch (one optimizer step), after the first ``skip``: the time from
    ``on_train_batch_start`` to ``on_train_batch_end`` (put this callback last; ``turn()``, if given, is
    called first: there the fit waits for its turn), and the host time REPA adds around the module's
    own work: its ``training_step`` wrapper less the module's ``training_step``, plus the callback's
    ``on_before_optimizer_step`` and ``on_train_batch_end``."""

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


def encoder(checkpoint: str, image_size: int) -> nn.Module:
    """The frozen teacher, built once per process and checkpoint (a fit never rereads it)."""
    from lightning_repa.encoders import load_encoder

    key = (checkpoint, image_size)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_encoder(ENCODER, image_size=image_size, checkpoint=checkpoint)
    return _ENCODERS[key]


class BenchRepa(RepaCallback):
    """RepaCallback whose encoder (frozen, stateless) is built once per process: only the per-step cost
    is measured, never the set-up (``build_encoder`` is the callback's extension point)."""

    def build_encoder(self) -> nn.Module:
        return encoder(str(self.config.encoder_checkpoint), self.config.encoder_image_size)


def repa_callback(mode: str, s: Any, checkpoint: str) -> Optional[RepaCallback]:
    """The callback of ``mode``: none (baseline), uncached, cached (memory), or at weight 0 (lam=0)."""
    if mode == "baseline":
        return None
    options = dict(family=s.family, block_index=s.aligned_block(), encoder=ENCODER, encoder_checkpoint=checkpoint,
                   encoder_image_size=s.encoder_image_size, decoder=effective_decoder(s))
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


def run_fit(mode: str, s: Any, checkpoint: str, steps: Optional[int] = None,
            turn: Optional[Callable[[], None]] = None) -> Fit:
    """``trainer.fit`` of a fresh module in ``mode``: one untimed epoch (it fills the cache), then
    ``steps`` timed steps; ``turn()`` is called before each step (``take_turns``)."""
    gc.collect()
    repa = repa_callback(mode, s, checkpoint)
    timer = StepTimer(skip=s.batches, now=s.now(), repa=repa, turn=turn)
    module = BenchFlow(s)
    trainer = L.Trainer(
        max_steps=s.batches + (s.steps if steps is None else steps), accelerator="gpu" if s.device == "cuda" else "cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        precision=s.precision, callbacks=([repa] if repa else []) + [timer],
    )
    trainer.fit(module, make_loader(s))
    misses = getattr(getattr(repa, "teacher", None), "misses", None)
    if mode == "cached" and misses is not None and misses != s.batches * s.batch_size:
        raise RuntimeError(f"the cache missed {misses} samples, expected one per sample")
    return Fit(mode, timer.times, timer.repa_times, repa, module)


def decode_encode_work(s: Any, vae: Optional[nn.Module], checkpoint: str) -> Callable[[dict[str, Any]], Any]:
    """What an uncached step's teacher does, from public pieces: decode the latents with the VAE
    (``vae.decode(z / scaling_factor).sample`` to [0, 1]) or take the pixels, and encode them."""
    enc = encoder(checkpoint, s.encoder_image_size).to(s.device)

    def work(batch: dict[str, Any]) -> Any:
        with torch.no_grad(), torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.precision.startswith("bf16")):
            if vae is None:
                images = batch["pixels"]
            else:
                images = ((vae.decode(batch["latents"] / vae.config.scaling_factor).sample.float() + 1) / 2).clamp(0, 1)
            return enc(images)

    return work


def align_work(s: Any, hidden: int, tokens: int, checkpoint: str) -> Callable[[dict[str, Any]], Any]:
    """Projector (LayerNorm + Linear, the callback's ``linear``) and the negative token cosine
    (``lightning_repa.losses.token_cosine``), forward and backward, on random student tokens (B, T, hidden)
    and random teacher tokens of the teacher's width: what a cached step adds at the least (the student
    and teacher grids are equal here, so nothing is resampled)."""
    from lightning_repa.losses import token_cosine

    width = encoder(checkpoint, s.encoder_image_size).embed_dim
    projector = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width)).to(s.device)
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(s.batch_size, tokens, width, generator=gen).to(s.device)

    def work(batch: dict[str, Any]) -> None:
        student = torch.randn(s.batch_size, tokens, hidden, generator=gen).to(s.device).requires_grad_(True)
        with torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.precision.startswith("bf16")):
            loss = -token_cosine(projector(student), target).mean()
        loss.backward()

    return work


def probe_loop(work: Callable[[dict[str, Any]], Any], batches: list[dict[str, Any]], s: Any,
               turn: Callable[[], None]) -> list[float]:
    """``work`` on the batches in training order, one call a turn, as many turns as a fit takes steps;
    the times of the calls after the first epoch."""
    now, times = s.now(), []
    for i in range(s.batches + s.steps):
        turn()
        t0 = now()
        work(batches[i % len(batches)])
        if s.device == "cuda":
            torch.cuda.synchronize()
        if i >= s.batches:
            times.append(now() - t0)
    return times


def setup_facts(fit: Fit, batch: dict[str, Any], s: Any, checkpoint: str) -> dict[str, Any]:
    """What was measured, read off the built objects."""
    denoiser, vae, family = fit.module.transformer, fit.module.vae, FAMILIES[s.family]
    side = s.latent * s.vae_factor
    return {
        "denoiser": type(denoiser).__name__,
        "denoiser_params_m": sum(p.numel() for p in denoiser.parameters()) / 1e6,
        "blocks": len(family.block_modules(denoiser)), "hidden": family.hidden_size(denoiser),
        "block_index": getattr(fit.repa, "block_index", s.aligned_block()), "student_grid": list(family.grid(batch["latents"].shape, denoiser)),
        "teacher_grid": list(encoder(checkpoint, s.encoder_image_size).grid_for(side, side)),
        "decoder": effective_decoder(s),
        "vae_decoder_params_m": 0.0 if vae is None else sum(p.numel() for p in vae.decoder.parameters()) / 1e6,
        "vae_factor": s.vae_factor,
    }


def rotated(items: tuple[str, ...], k: int) -> list[str]:
    k %= len(items)
    return list(items[k:] + items[:k])


def measure(s: Any, checkpoint: str, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``repeats`` rounds; in a round every mode's fit and both probes run side by side in threads that
    take turns step by step (the ring's order rotated from round to round). Returns per name the step
    times of every round (``<name>`` -> list of rounds -> list of steps; step i of every name ran in the
    same turn) and the REPA host times (``<mode>_repa_host``), and facts about the setup."""
    batches = [{k: v.to(s.device) for k, v in b.items()} for b in make_loader(s)]
    reference = run_fit("uncached", s, checkpoint, steps=1)  # warms the process
    facts = setup_facts(reference, batches[0], s, checkpoint)
    probes = {"decode_encode": decode_encode_work(s, reference.module.vae, checkpoint),
              "align": align_work(s, facts["hidden"], math.prod(facts["student_grid"]), checkpoint)}
    samples: dict[str, list[list[float]]] = {}
    for r in range(s.repeats):
        work: dict[str, Callable[[Callable[[], None]], Any]] = {}
        for name in rotated(MODES + PROBES, r):
            work[name] = (functools.partial(probe_loop, probes[name], batches, s) if name in probes
                          else functools.partial(run_fit, name, s, checkpoint, None))
        done = take_turns(work)
        for name in MODES + PROBES:
            samples.setdefault(name, []).append(done[name] if name in probes else done[name].times)
        for mode in MODES:
            samples.setdefault(f"{mode}_repa_host", []).append(done[mode].repa_times)
        cache = getattr(done["cached"].repa, "teacher", None)
        facts["cache"] = {"hits": getattr(cache, "hits", None), "misses": getattr(cache, "misses", None)}
        log(f"  round {r + 1}/{s.repeats}: " + ", ".join(
            f"{n} {statistics.median(samples[n][-1]) * 1e3:.1f}" for n in MODES + PROBES) + " ms")
    return samples, facts


def memory_worker(mode: str, settings: str, checkpoint: str) -> dict[str, float]:
    """In a fresh process: one fit of ``mode`` (the cache-filling epoch and two steps), and its peaks."""
    from overhead import Settings

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


def peak_memory(s: Any, checkpoint: str) -> dict[str, dict[str, float]]:
    """Peaks of a fresh process per mode, side by side (peaks do not add up). The processes are forked
    from a fork server that has imported torch, Lightning, diffusers and timm and done nothing else."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torch", "lightning", "diffusers", "timm", "lightning_repa", "common",
                                    "overhead_fits", "overhead"])
    pools = {mode: ctx.Pool(1, maxtasksperchild=1) for mode in MODES}
    try:
        jobs = {mode: pool.apply_async(memory_worker, (mode, s.to_json(), checkpoint)) for mode, pool in pools.items()}
        return {mode: job.get() for mode, job in jobs.items()}
    finally:
        for pool in pools.values():
            pool.close()
            pool.join()
