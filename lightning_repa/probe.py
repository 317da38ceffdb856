"""Alignment diagnostics: which block of a denoiser already looks like the teacher?

:func:`probe` runs a denoiser over a few batches of real data at chosen noise levels, with a hook on
every block (the package's own :class:`~lightning_repa.capture.BlockCapture`, so the image tokens
are exactly the ones the callback would align), and measures for each block and noise level how
well its token-averaged features agree with the teacher's token-averaged features of the clean
images, without training anything:

- **CKNNA** (Huh et al. 2024, the metric REPA uses to study representation alignment; k nearest
  neighbours, on L2-normalised features) and
- **linear CKA** (Kornblith et al. 2019, on the raw features),

both from :mod:`lightning_repa.kernel_alignment` (formulas and references there). It suggests a
block (see :func:`suggest_block`), prints a table, and writes JSON and a PNG plot of alignment
against block index. ``lightning-repa-probe`` (or ``python -m lightning_repa.probe``) is the
Hydra app; with no arguments it probes the demo DiT against the shipped digits teacher::

    lightning-repa-probe                                          # a fresh demo DiT, 180 held-out digits
    lightning-repa-probe ckpt_path=outputs/demo/<time>/checkpoints/last.ckpt
    lightning-repa-probe noise_levels=[0.1,0.5,0.9] k=20 num_samples=120

The config (``lightning_repa/conf/probe.yaml``) reuses the training app's groups: ``model=``,
``data=``, ``family=``, ``encoder=`` (so ``encoder=dinov2_vitb14 repa.encoder_checkpoint=PATH``
works), with ``forward=`` naming a function ``(model, x_t, t, batch) -> output`` that calls your
model.

Importing this module imports no Lightning (nor matplotlib, until a plot is drawn); the app
imports the demo's modules, which are Lightning modules, when it runs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import hydra
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_repa.hydra_config  # noqa: F401  (the `repa_demo_teacher` resolver of encoder/demo_vit.yaml)
from lightning_repa.capture import BlockCapture
from lightning_repa.families import Family, get_family
from lightning_repa.kernel_alignment import cknna, linear_cka
from lightning_repa.surgery import find_denoiser, unwrap
from lightning_repa.teacher import EncoderTeacher

__all__ = ["demo_forward", "format_table", "main", "plot", "probe", "rectified_flow", "run", "suggest_block",
           "write_outputs"]

Forward = Callable[[Tensor, Tensor, Mapping[str, Any]], Any]


def rectified_flow(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """`x_t = (1 - t) x0 + t · noise`, `t` (B,) in [0, 1] (0: clean, 1: pure noise)."""
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - tb) * x0 + tb * noise


def demo_forward(model: nn.Module, x_t: Tensor, t: Tensor, batch: Mapping[str, Any]) -> Any:
    """How the CLI calls the demo's modules (`FlowMatchingDiT`, `FlowMatchingUNet`): `model(x_t, t, labels)`."""
    return model(x_t, t, batch["labels"])


def suggest_block(scores: Sequence[float], depth_fraction: float = 2 / 3) -> Optional[int]:
    """The block to align: the highest score (CKNNA averaged over noise levels) among the first
    `ceil(depth_fraction * L)` of the L blocks (at least one); None when all of those are NaN.

    Why this rule: REPA (Yu et al. 2025, "Representation alignment for generation", section 4 and
    its block ablation) found that aligning an early-to-middle block helps most (block 8 of
    SiT-XL/2's 28) and that aligning later blocks helps less: the last blocks turn the
    representation into the prediction (velocity or noise) and are better left to the diffusion
    loss. The probe measures where teacher-like features already form without training; among the
    blocks REPA would consider, the one that agrees most with the teacher needs the least bending
    to align. It is a heuristic starting point: on a model whose early blocks are uniformly weak it
    still names one, and a fresh model's alignment says little (probe the model you will train,
    e.g. the pretrained base of a fine-tune).
    """
    if not 0.0 < depth_fraction <= 1.0:
        raise ValueError(f"`depth_fraction` must be in (0, 1], got {depth_fraction}")
    window = max(1, math.ceil(depth_fraction * len(scores) - 1e-9))
    candidates = [(s, -i) for i, s in enumerate(scores[:window]) if s is not None and not math.isnan(s)]
    return -max(candidates)[1] if candidates else None


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _resolve_denoiser(model: nn.Module, family: Family) -> nn.Module:
    """The denoiser itself when it is of the family's class, else the one at `.denoiser`,
    `.transformer`, `.unet` or `.model` (unwrapped), as the callback finds it."""
    model = unwrap(model)
    names = {cls.__name__ for cls in type(model).__mro__}
    if names & set(family.classes):
        return model
    found, _ = find_denoiser(model, None)
    return model if found is None else found  # not a denoiser: the capture's class check says what it is


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


def _pool(tokens: Tensor) -> Tensor:
    """(B, ..., D) tokens -> (B, D) token mean, float64 on the CPU."""
    return tokens.detach().reshape(tokens.shape[0], -1, tokens.shape[-1]).to(torch.float64).mean(dim=1).cpu()


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
        family: its family, a name of `lightning_repa.families.FAMILIES` or a `Family` (anything
            `get_family` takes): which blocks exist, in which order, where the image tokens sit.
        batches: an iterable of batch dicts (a DataLoader) with clean latents under `latents_key`
            and, for a plain image encoder, the clean images under `pixels_key`.
        encoder: the teacher. An image encoder (images (B, 3, H, W) in [0, 1] -> tokens (B, M, D),
            e.g. :func:`lightning_repa.encoders.load_encoder`) reads the batch's pixels (in
            `pixels_range`); an :class:`~lightning_repa.teacher.EncoderTeacher` is used as is
            (e.g. one that decodes the latents with a VAE).
        noise_levels: flow times t; each batch gets one noise draw shared by all levels.
        k: CKNNA's neighbours (Huh et al. and REPA: 10); needs more than `k` samples.
        num_samples: stop after this many samples (the last batch is cut); None: all batches.
        seed: seeds the noise: one CPU `torch.Generator`, `torch.randn(latents.shape)` per batch in order.
        add_noise: `(x0, noise, t) -> x_t`; rectified flow by default (DDPM-type models: your
            schedule's `alpha_t x0 + sigma_t noise`).
        normalize: L2-normalise each sample's features before CKNNA (the cosine kernel of Huh et
            al. and REPA). CKA always uses the raw features: it centres and is scale-free itself.
        depth_fraction: the suggestion looks at the first `ceil(depth_fraction * L)` blocks.
        output_dir: when given, `probe.json` and `probe.png` are written there
            (:func:`write_outputs`) and their paths recorded under ``"files"``.

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
    fam = family if isinstance(family, Family) else get_family(family)
    levels = [float(t) for t in noise_levels]
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
    teacher = encoder if isinstance(encoder, EncoderTeacher) else EncoderTeacher(encoder, None, pixels_key, pixels_range)

    model = _resolve_denoiser(denoiser, fam)
    fam.check_class(model)
    num_blocks = len(fam.block_modules(model))
    device, dtype = _device_and_dtype(model)
    capture = BlockCapture(model, fam, list(range(num_blocks)))
    generator = torch.Generator().manual_seed(seed)
    student: list[list[list[Tensor]]] = [[[] for _ in levels] for _ in range(num_blocks)]
    target: list[Tensor] = []
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
            target.append(_pool(teacher(batch, x0, None)[0]))
            for j, level in enumerate(levels):
                t = torch.full((size,), level, device=device)
                x_t = add_noise(x0, noise, t).to(dtype)
                capture.arm(math.prod(grid), with_grad=False)  # a diagnostic: calls without gradients count
                with torch.no_grad():
                    forward(x_t, t, batch)
                    for index in range(num_blocks):
                        student[index][j].append(_pool(capture.take(index)))
                capture.disarm()
            seen += size
    finally:
        capture.detach()
        for module, mode in modes.items():
            module.train(mode)
    if seen <= k or seen < 4:
        raise ValueError(f"probe: CKNNA with k={k} needs more than k (and at least 4) samples; the batches held {seen}")

    teacher_features = torch.cat(target)  # (N, D_teacher)
    teacher_knn = F.normalize(teacher_features, dim=-1) if normalize else teacher_features
    blocks = []
    for index in range(num_blocks):
        scores: dict[str, list[float]] = {"cknna": [], "cka": []}
        for j in range(len(levels)):
            features = torch.cat(student[index][j])  # (N, D_student)
            scores["cknna"].append(cknna(F.normalize(features, dim=-1) if normalize else features, teacher_knn, k))
            scores["cka"].append(linear_cka(features, teacher_features))
        blocks.append({"index": index, **scores, "cknna_mean": _nanmean(scores["cknna"]),
                       "cka_mean": _nanmean(scores["cka"])})
    means = [b["cknna_mean"] for b in blocks]
    window = max(1, math.ceil(depth_fraction * num_blocks - 1e-9))
    result: dict[str, Any] = {
        "family": fam.name,
        "num_blocks": num_blocks,
        "num_samples": seen,
        "noise_levels": levels,
        "k": k,
        "seed": seed,
        "normalize": normalize,
        "depth_fraction": depth_fraction,
        "student_width": int(student[0][0][0].shape[-1]) if num_blocks else None,
        "teacher_width": int(teacher_features.shape[-1]),
        "blocks": blocks,
        "suggested_block": suggest_block(means, depth_fraction),
        "best_block": suggest_block(means, 1.0),
        "rule": f"highest CKNNA (mean over noise levels) among blocks 0..{window - 1} "
        f"(the first {window} of {num_blocks}: ceil({depth_fraction:.3g} x depth))",
    }
    if output_dir is not None:
        json_path, png_path = write_outputs(result, output_dir)
        result["files"] = {"json": str(json_path), "png": None if png_path is None else str(png_path)}
    return result


# --------------------------------------------------------------------------- reporting


def _cell(value: Optional[float]) -> str:
    return "   nan" if value is None or math.isnan(value) else f"{value:6.3f}"


def format_table(result: Mapping[str, Any]) -> str:
    """The result as a text table: one row per block, CKNNA and CKA per noise level and their means."""
    levels = result["noise_levels"]
    head = [f"t={t:.2f}" for t in levels]
    width = 7 * (len(levels) + 1)
    title = (f"{result['family']}: {result['num_blocks']} blocks, {result['num_samples']} samples, "
             f"CKNNA k={result['k']}{' (L2-normalised)' if result['normalize'] else ''}, linear CKA")
    lines = [
        title,
        f"{'':>6} | {'CKNNA':^{width - 1}}| {'CKA':^{width - 1}}",
        f"{'block':>6} | " + " ".join(f"{h:>6}" for h in [*head, "mean"]) + " | "
        + " ".join(f"{h:>6}" for h in [*head, "mean"]),
    ]
    window = max(1, math.ceil(result["depth_fraction"] * result["num_blocks"] - 1e-9))
    for block in result["blocks"]:
        index = block["index"]
        note = "  <- suggested" if index == result["suggested_block"] else ("  (late)" if index >= window else "")
        lines.append(
            f"{index:>6} | " + " ".join(_cell(v) for v in [*block["cknna"], block["cknna_mean"]]) + " | "
            + " ".join(_cell(v) for v in [*block["cka"], block["cka_mean"]]) + note
        )
    lines.append(f"suggested block: {result['suggested_block']}   ({result['rule']})")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def plot(result: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """A PNG of CKNNA and CKA against block index (one line per noise level, the mean in black, the
    suggested block marked, the blocks outside the suggestion's window shaded). Needs matplotlib;
    no pyplot state is touched (an Agg canvas of its own). `result` may be a loaded `probe.json`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = result["blocks"]
    x = [b["index"] for b in blocks]
    fig = Figure(figsize=(10, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    window = max(1, math.ceil(result["depth_fraction"] * result["num_blocks"] - 1e-9))
    for ax, key, label in zip(fig.subplots(1, 2), ("cknna", "cka"), (f"CKNNA (k={result['k']})", "linear CKA")):
        for j, t in enumerate(result["noise_levels"]):
            ax.plot(x, [_nan(b[key][j]) for b in blocks], marker="o", ms=3, lw=1, label=f"t = {t:.2f}")
        ax.plot(x, [_nan(b[f"{key}_mean"]) for b in blocks], color="black", lw=2, label="mean")
        if window < len(blocks):
            ax.axvspan(window - 0.5, len(blocks) - 0.5, color="0.9", zorder=0, label="not suggested (late)")
        if result["suggested_block"] is not None:
            ax.axvline(result["suggested_block"], color="tab:red", ls="--", lw=1,
                       label=f"suggested: {result['suggested_block']}")
        ax.set_xlabel("block index")
        ax.set_ylabel(label)
        ax.set_title(f"{label} with the teacher")
        ax.grid(alpha=0.3)
        if len(x) <= 30:
            ax.set_xticks(x)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.suptitle(f"{result['family']}: {result['num_samples']} samples, token-averaged features")
    path = Path(path)
    fig.savefig(path)
    return path


def _nan(value: Optional[float]) -> float:
    return math.nan if value is None else value


def write_outputs(result: Mapping[str, Any], output_dir: Union[str, os.PathLike]) -> tuple[Path, Optional[Path]]:
    """Write `probe.json` and `probe.png` into `output_dir`; the PNG is skipped (None, with a note)
    when matplotlib is not installed."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "probe.json"
    json_path.write_text(json.dumps(_jsonable({k: v for k, v in result.items() if k != "files"}), indent=2) + "\n")
    try:
        png_path: Optional[Path] = plot(result, out / "probe.png")
    except ImportError:
        print("probe: matplotlib is not installed, so no plot was written (pip install matplotlib)")
        png_path = None
    return json_path, png_path


# --------------------------------------------------------------------------- the Hydra app


def run(cfg: Any) -> dict[str, Any]:
    """The app's work on a composed `cfg` (``conf/probe.yaml``): build the model (from `ckpt_path`
    when set), the data and the teacher, probe, write JSON and PNG into `paths.output_dir`, print
    the table and where the files went. Returns :func:`probe`'s dict."""
    from hydra.utils import get_method, instantiate
    from omegaconf import OmegaConf

    if "${hydra:" in str(OmegaConf.to_container(cfg.paths)["output_dir"]):
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ValueError("`paths.output_dir` follows Hydra's run directory; without @hydra.main, set paths.output_dir=...")
    repa = cfg.repa
    if str(repa.get("decoder", "pixels")) != "pixels":
        raise ValueError(
            f"lightning-repa-probe reads the clean images from the batch (decoder=pixels), got decoder={repa.decoder}; "
            "for latents, call lightning_repa.probe.probe() with an EncoderTeacher that decodes them"
        )
    import lightning_repa.demo  # noqa: F401  (registers the shipped digits teacher with timm)
    from lightning_repa.encoders import load_encoder

    threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        torch.manual_seed(cfg.seed)
        model = _build_model(cfg, instantiate)
        device = torch.device(cfg.device)
        model.to(device)
        datamodule = instantiate(cfg.data)
        if hasattr(datamodule, "setup"):
            datamodule.setup("validate" if cfg.split == "val" else "fit")
        loader = datamodule.val_dataloader() if cfg.split == "val" else datamodule.train_dataloader()
        encoder = load_encoder(repa.encoder, image_size=repa.encoder_image_size, checkpoint=repa.encoder_checkpoint)
        encoder.to(device)
        call = get_method(cfg.forward)
        result = probe(
            lambda x_t, t, batch: call(model, x_t, t, batch),
            model,
            repa.family,
            loader,
            encoder,
            list(cfg.noise_levels),
            k=cfg.k,
            num_samples=cfg.num_samples,
            seed=cfg.seed,
            latents_key=repa.get("latents_key", "latents"),
            pixels_key=repa.get("pixels_key", "pixels"),
            pixels_range=list(repa.get("pixels_range", [0.0, 1.0])),
            normalize=cfg.normalize,
            depth_fraction=cfg.depth_fraction,
        )
    finally:
        torch.set_num_threads(threads)
    result["checkpoint"] = cfg.ckpt_path
    result["configured_block"] = repa.get("block_index")
    json_path, png_path = write_outputs(result, cfg.paths.output_dir)
    result["files"] = {"json": str(json_path), "png": None if png_path is None else str(png_path)}
    _print_summary(result)
    return result


def _build_model(cfg: Any, instantiate: Callable) -> nn.Module:
    """`cfg.model`, with the checkpoint's architecture and weights when `ckpt_path` is set."""
    if not cfg.ckpt_path:
        return instantiate(cfg.model)
    path = Path(cfg.ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`ckpt_path`={str(cfg.ckpt_path)!r}: no such file (a last.ckpt of lightning-repa-train)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"`ckpt_path`={str(path)!r} holds no state_dict")
    hparams = checkpoint.get("hyper_parameters") or {}
    model = instantiate(cfg.model, **{key: value for key, value in hparams.items() if key in cfg.model})
    own = model.state_dict()
    # The callback's projector (`repa_projector`, `repa_projector_0`, ...) is not part of the model.
    unexpected = sorted(key for key in state if key not in own and not key.startswith("repa_projector"))
    missing = sorted(key for key in own if key not in state)
    if unexpected or missing:
        raise ValueError(
            f"`ckpt_path`={str(path)!r} does not fit {type(model).__name__} as configured: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}; pass the model= and model.* overrides it was trained with"
        )
    model.load_state_dict({key: state[key] for key in own}, strict=True)
    return model


def _print_summary(result: Mapping[str, Any]) -> None:
    bar = "=" * 78
    lines = ["", bar, "lightning-repa-probe: alignment of every block with the teacher (nothing trained)",
             f"model       {result.get('checkpoint') or 'freshly initialised (no ckpt_path)'}", "",
             format_table(result), ""]
    if result.get("configured_block") is not None:
        lines.append(f"configured  repa.block_index={result['configured_block']} (the block the training config aligns)")
    files = result.get("files") or {}
    lines.append(f"JSON        {files.get('json')}")
    lines.append(f"plot        {files.get('png') or 'not written (matplotlib missing)'}")
    lines.append(bar)
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="probe")
def main(cfg: Any) -> None:
    """Entry point of ``lightning-repa-probe`` (see the module docstring)."""
    run(cfg)


if __name__ == "__main__":
    main()
