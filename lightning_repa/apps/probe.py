"""``lightning-repa-probe`` (``python -m lightning_repa.apps.probe``): which block of a denoiser
already looks like the teacher? The Hydra app around :func:`lightning_repa.diagnostics.probe.probe`.

``main()`` is the ``@hydra.main`` shim over ``conf/probe.yaml``; ``run(cfg)`` does the work. With no
arguments it probes a fresh demo DiT against the shipped digits teacher on the 180 held-out digits::

    lightning-repa-probe
    lightning-repa-probe ckpt_path=outputs/demo/<time>/checkpoints/last.ckpt
    lightning-repa-probe noise_levels=[0.1,0.5,0.9] k=20 num_samples=120

The config reuses the training app's groups: ``model=``, ``data=``, ``family=``, ``encoder=`` (so
``encoder=dinov2_vitb14 repa.encoder_checkpoint=PATH`` works), with ``forward=`` naming a function
``(model, x_t, t, batch) -> output`` that calls your model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import hydra
import torch
from torch import nn

import lightning_repa.apps.hydra_config  # noqa: F401  (the `repa_demo_teacher` resolver of encoder/demo_vit.yaml)
from lightning_repa.apps.runtime import output_dir, run_app, say, torch_threads
from lightning_repa.callbacks.attach import is_projector_key
from lightning_repa.choices import Decoder
from lightning_repa.config import RepaConfig, resolve
from lightning_repa.diagnostics.probe import probe
from lightning_repa.diagnostics.report import format_table, write_outputs
from lightning_repa.models.surgery import require_denoiser
from lightning_repa.teachers.build import load_config_encoder

__all__ = ["demo_forward", "main", "run"]


def demo_forward(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: Mapping[str, Any]) -> Any:
    """How the app calls the demo's modules (`FlowMatchingDiT`, `FlowMatchingUNet`): `model(x_t, t, labels)`."""
    return model(x_t, t, batch["labels"])


def run(cfg: Any) -> dict[str, Any]:
    """The app's work on a composed `cfg` (``conf/probe.yaml``): build the model (from `ckpt_path`
    when set), the data and the teacher, probe, write JSON and PNG into `paths.output_dir`, print
    the table and where the files went. Returns :func:`probe`'s dict."""
    from hydra.utils import get_method, instantiate

    out = output_dir(cfg)
    config = RepaConfig.from_node(cfg.repa)  # every repa option checked, as training checks it
    resolved = resolve(config)
    if config.decoder is not Decoder.pixels:
        raise ValueError(
            f"lightning-repa-probe reads the clean images from the batch (decoder=pixels), got decoder={config.decoder.value}; "
            "for latents, call lightning_repa.diagnostics.probe.probe() with an EncoderTeacher that decodes them"
        )
    import lightning_repa.demo  # noqa: F401  (registers the shipped digits teacher with timm)

    with torch_threads(cfg.torch_threads):
        torch.manual_seed(cfg.seed)
        model = _build_model(cfg, instantiate)
        _check_block(resolved, model)
        device = torch.device(cfg.device)
        model.to(device)
        datamodule = instantiate(cfg.data)
        if hasattr(datamodule, "setup"):
            datamodule.setup("validate" if cfg.split == "val" else "fit")
        loader = datamodule.val_dataloader() if cfg.split == "val" else datamodule.train_dataloader()
        encoder = load_config_encoder(config).to(device)
        call = get_method(cfg.forward)
        result = probe(
            lambda x_t, t, batch: call(model, x_t, t, batch), model, resolved.family, loader, encoder,
            list(cfg.noise_levels), k=cfg.k, num_samples=cfg.num_samples, seed=cfg.seed,
            latents_key=config.latents_key, pixels_key=config.pixels_key, pixels_range=config.pixels_range,
            normalize=cfg.normalize, depth_fraction=cfg.depth_fraction,
        )
    result["checkpoint"] = cfg.ckpt_path
    result["configured_block"] = resolved.block_index
    json_path, png_path = write_outputs(result, out)
    result["files"] = {"json": str(json_path), "png": None if png_path is None else str(png_path)}
    result["wandb_dir"] = _log_to_wandb(cfg, result, png_path)
    _print_summary(result)
    return result


def _log_to_wandb(cfg: Any, result: Mapping[str, Any], png: Any) -> Any:
    """With `logger=wandb`: the plot as an image and one row per block (CKNNA and CKA per noise level
    and their means) as a table, in a W&B run of its own; returns the run's directory."""
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import WandbLogger

    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node]
    wandb = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not wandb:
        return None
    levels = [f"t={t:.2f}" for t in result["noise_levels"]]
    columns = ["block", *[f"cknna {t}" for t in levels], "cknna mean", *[f"cka {t}" for t in levels], "cka mean"]
    rows = [[b["index"], *b["cknna"], b["cknna_mean"], *b["cka"], b["cka_mean"]] for b in result["blocks"]]
    logger = wandb[0]
    if png is not None:
        logger.log_image(key="probe", images=[str(png)], caption=[f"{result['family']}: suggested block "
                                                                   f"{result['suggested_block']}"])
    logger.log_table(key="probe_blocks", columns=columns, data=rows)
    directory = Path(logger.experiment.dir).parent if getattr(logger.experiment, "dir", None) else None
    logger.experiment.finish()
    return directory


def _check_block(resolved: Any, model: nn.Module) -> None:
    """The configured block (`repa.block_index`, or the family default) exists in the model."""
    blocks = len(resolved.family.block_modules(require_denoiser(model, resolved.family)))
    if resolved.block_index >= blocks:
        raise IndexError(f"repa.block_index={resolved.block_index} is out of range for family="
                         f"{resolved.family.name!r}: the model has {blocks} blocks; use 0..{blocks - 1}")


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
    # The callback's projectors are not part of the model.
    unexpected = sorted(key for key in state if key not in own and not is_projector_key(key))
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
    if result.get("wandb_dir"):
        lines.append(f"W&B run     {result['wandb_dir']}   (upload: wandb sync <it>)")
    lines.append(bar)
    say("\n".join(lines))


@hydra.main(version_base="1.3", config_path="pkg://lightning_repa.conf", config_name="probe")
def main(cfg: Any) -> None:
    """Entry point of ``lightning-repa-probe`` (see the module docstring)."""
    run_app("lightning-repa-probe", run, cfg)


if __name__ == "__main__":
    main()
