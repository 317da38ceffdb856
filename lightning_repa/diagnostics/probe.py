"""Alignment diagnostics: which block of a denoiser already looks like the teacher?

:func:`probe` runs a denoiser over a few batches of real data at chosen noise levels, with a hook on
every block (the package's own :class:`~lightning_repa.models.capture.BlockCapture`, so the image
tokens are exactly the ones the callback would align), and measures for each block and noise level
how well its token-averaged features agree with the teacher's token-averaged features of the clean
images, without training anything: CKNNA (Huh et al. 2024, the metric REPA uses; k nearest
neighbours, on L2-normalised features) and linear CKA (Kornblith et al. 2019, on the raw features),
both through :class:`~lightning_repa.maths.kernel_alignment.KernelAlignment`, the measure the
callback's `repa/cknna` uses too. It suggests a block (:func:`suggest_block`); `report` prints and
plots the result, and ``lightning-repa-probe`` (`lightning_repa.apps.probe`) is the Hydra app.

No Lightning import.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_repa.maths.kernel_alignment import KernelAlignment
from lightning_repa.models.capture import BlockCapture
from lightning_repa.models.families import Family, get_family
from lightning_repa.models.surgery import require_denoiser
from lightning_repa.diagnostics.suggest import suggest_block, suggestion_window
from lightning_repa.teachers.encoder_teacher import EncoderTeacher

__all__ = ["probe", "rectified_flow", "suggest_block", "suggestion_window"]

Forward = Callable[[Tensor, Tensor, Mapping[str, Any]], Any]


def rectified_flow(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """`x_t = (1 - t) x0 + t · noise`, `t` (B,) in [0, 1] (0: clean, 1: pure noise)."""
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - tb) * x0 + tb * noise


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}


def _take(batch: Mapping[str, Any], size: int, n: int) -> dict[str, Any]:
    """The first `n` samples of a batch of `size` (tensors and lists along their first axis)."""
    def cut(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            return value[:n]
        if isinstance(value, (list, tuple)) and len(value) == size:
            return value[:n]
        return value

    return {key: cut(value) for key, value in batch.items()}


def _check_arguments(levels: list[float], k: int, num_samples: Optional[int], depth_fraction: float) -> None:
    if not levels:
        raise ValueError("probe: `noise_levels` is empty; give at least one flow time in [0, 1], e.g. [0.25, 0.5, 0.75]")
    if any(not 0.0 <= t <= 1.0 for t in levels):
        raise ValueError(f"probe: `noise_levels` must be flow times in [0, 1] (0: clean, 1: noise), got {levels}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"probe: CKNNA's `k` must be an int >= 2 (Huh et al. and REPA use 10), got {k!r}")
    if num_samples is not None and num_samples <= k:
        raise ValueError(f"probe: CKNNA with k={k} needs more than k samples, got num_samples={num_samples}")
    if not 0.0 < depth_fraction <= 1.0:
        raise ValueError(f"probe: `depth_fraction` must be in (0, 1], got {depth_fraction}")


def probe(
    forward: Forward,
    denoiser: nn.Module,
    family: Union[str, Family, Mapping[str, Any]],
    batches: Iterable[Mapping[str, Any]],
    encoder: nn.Module,
    noise_levels: Sequence[float] = (0.25, 0.5, 0.75),
    *,
    k: int = 10,
    num_samples: Optional[int] = None,
    seed: int = 0,
    latents_key: str = "latents",
    pixels_key: str = "pixels",
    pixels_range: Sequence[float] = (0.0, 1.0),
    add_noise: Callable[[Tensor, Tensor, Tensor], Tensor] = rectified_flow,
    normalize: bool = True,
    depth_fraction: float = 2 / 3,
    output_dir: Union[str, os.PathLike, None] = None,
) -> dict[str, Any]:
    """Alignment of every block of `denoiser` with the teacher, per noise level; nothing is trained.

    Args:
        forward: `forward(x_t, t, batch)` calls the model once on noisy latents `x_t` (B, C, h, w)
            (video: (B, C, T, h, w)), in the denoiser's dtype and device, at flow times `t` (B,)
            float32 in [0, 1] (convert to your model's timestep convention inside), with the rest
            of the batch (on the same device) for conditioning. Its return value is ignored.
            E.g. the demo: ``lambda x_t, t, batch: module(x_t, t, batch["labels"])``.
        denoiser: the diffusers denoiser whose blocks are hooked, or a module holding it at
            `.denoiser`, `.transformer`, `.unet` or `.model` (torch.compile / PEFT / DDP unwrapped).
        family: its family, a name of `lightning_repa.FAMILIES` or a `Family` (anything
            `get_family` takes): which blocks exist, in which order, where the image tokens sit.
        batches: an iterable of batch dicts (a DataLoader) with clean latents under `latents_key`
            and, for a plain image encoder, the clean images under `pixels_key`.
        encoder: the teacher. An image encoder (images (B, 3, H, W) in [0, 1] -> tokens (B, M, D),
            e.g. :func:`lightning_repa.encoders.load_encoder`) reads the batch's pixels (in
            `pixels_range`); an :class:`~lightning_repa.teachers.EncoderTeacher` is used as is
            (e.g. one that decodes the latents with a VAE).
        noise_levels: flow times t; each batch gets one noise draw shared by all levels.
        k: CKNNA's neighbours (Huh et al. and REPA: 10); needs more than `k` samples.
        num_samples: stop after this many samples (the last batch is cut); None: all batches.
        seed: seeds the noise: one CPU `torch.Generator`, `torch.randn(latents.shape)` per batch in order.
        add_noise: `(x0, noise, t) -> x_t`; rectified flow by default (DDPM-type models: your
            schedule's `alpha_t x0 + sigma_t noise`).
        normalize: L2-normalise each sample's features before CKNNA (the cosine kernel of Huh et
            al. and REPA). CKA always uses the raw features: it centres and is scale-free itself.
        depth_fraction: the suggestion looks at the first `suggestion_window(L, depth_fraction)` blocks.
        output_dir: when given, `probe.json` and `probe.png` are written there
            (`lightning_repa.diagnostics.report.write_outputs`) and their paths recorded under ``"files"``.

    Features: each block's image tokens (B, N, D) and the teacher's tokens are averaged over
    tokens, so one vector per sample (as REPA measures alignment), and compared across the N
    samples. The forward runs in eval mode (the mode is restored) under `torch.no_grad()`; the
    capture takes the first denoiser call of each forward, and is detached afterwards.

    Returns a dict: ``family``, ``num_blocks``, ``num_samples``, ``noise_levels``, ``k``, ``seed``,
    ``normalize``, ``depth_fraction``, ``student_width``, ``teacher_width``, ``blocks`` (one entry per
    block: ``index``, ``cknna`` and ``cka`` (lists aligned with ``noise_levels``), ``cknna_mean``,
    ``cka_mean``), ``suggested_block`` (see :func:`suggest_block`), ``best_block`` (highest mean
    CKNNA over all blocks) and ``rule``; with `output_dir` also ``files`` (``json``, ``png``).
    """
    fam = get_family(family)
    levels = [float(t) for t in noise_levels]
    _check_arguments(levels, k, num_samples, depth_fraction)
    teacher = encoder if isinstance(encoder, EncoderTeacher) else EncoderTeacher(encoder, None, pixels_key, pixels_range)
    model = require_denoiser(denoiser, fam)
    num_blocks = len(fam.block_modules(model))
    device, dtype = _device_and_dtype(model)
    capture = BlockCapture(model, fam, list(range(num_blocks)))
    measures = [[KernelAlignment(k, normalize) for _ in levels] for _ in range(num_blocks)]
    widths = {}
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    modes = {m: m.training for m in (denoiser, model)}
    for module in modes:
        module.eval()
    capture.attach()
    try:
        for batch in batches:
            size = len(batch[latents_key])
            if num_samples is not None:
                if seen >= num_samples:
                    break
                if seen + size > num_samples:
                    batch, size = _take(batch, size, num_samples - seen), num_samples - seen
            batch = _to(batch, device)
            x0 = batch[latents_key].float()
            noise = torch.randn(x0.shape, generator=generator).to(device)
            grid = fam.grid(x0.shape, model)
            target = teacher(batch, x0, None).tokens  # (B, M, D) or (B, T, M, D)
            for j, level in enumerate(levels):
                t = torch.full((size,), level, device=device)
                x_t = add_noise(x0, noise, t).to(dtype)
                capture.arm(math.prod(grid), with_grad=False)  # a diagnostic: calls without gradients count
                with torch.no_grad():
                    forward(x_t, t, batch)
                    for index in range(num_blocks):
                        tokens = capture.take(index)  # (B, N, D)
                        widths.setdefault("student", int(tokens.shape[-1]))
                        measures[index][j].update(tokens, target)
                capture.disarm()
            widths["teacher"] = int(target.shape[-1])
            seen += size
    finally:
        capture.detach()
        for module, mode in modes.items():
            module.train(mode)
    if seen <= k or seen < 4:
        raise ValueError(f"probe: CKNNA with k={k} needs more than k (and at least 4) samples; the batches held {seen}")

    blocks = []
    for index in range(num_blocks):
        values = [{name: float(v) for name, v in m.compute().items()} for m in measures[index]]
        scores = {name: [v[name] for v in values] for name in ("cknna", "cka")}
        blocks.append({"index": index, **scores, "cknna_mean": _nanmean(scores["cknna"]),
                       "cka_mean": _nanmean(scores["cka"])})
    means = [b["cknna_mean"] for b in blocks]
    window = suggestion_window(num_blocks, depth_fraction)
    result: dict[str, Any] = {
        "family": fam.name,
        "num_blocks": num_blocks,
        "num_samples": seen,
        "noise_levels": levels,
        "k": k,
        "seed": seed,
        "normalize": normalize,
        "depth_fraction": depth_fraction,
        "student_width": widths.get("student"),
        "teacher_width": widths.get("teacher"),
        "blocks": blocks,
        "suggested_block": suggest_block(means, depth_fraction),
        "best_block": suggest_block(means, 1.0),
        "rule": f"highest CKNNA (mean over noise levels) among blocks 0..{window - 1} "
        f"(the first {window} of {num_blocks}: ceil({depth_fraction:.3g} x depth))",
    }
    if output_dir is not None:
        from lightning_repa.diagnostics.report import write_outputs

        json_path, png_path = write_outputs(result, output_dir)
        result["files"] = {"json": str(json_path), "png": None if png_path is None else str(png_path)}
    return result
