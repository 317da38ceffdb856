"""The Hydra training app: ``lightning-repa-train`` / ``python -m lightning_repa.apps.train``.

``main()`` is the thin ``@hydra.main`` shim; ``run(cfg)`` does the work and is what tests call
with a config from ``hydra.compose``. With no arguments the app runs the CPU demo (REPA on
scikit-learn's digits); ``experiment=demo`` pins it. The configs live in ``lightning_repa/conf``
(shipped with the package, so the app works from any directory)::

    lightning-repa-train experiment=demo
    lightning-repa-train experiment=demo trainer.max_steps=800 repa.lam=1.0 logger=[wandb,csv]
    lightning-repa-train -m experiment=demo repa.lam=0.25,0.5
    lightning-repa-train experiment=demo ckpt_path=outputs/demo/<time>/checkpoints/last.ckpt trainer.max_steps=800
    lightning-repa-train simpletuner_config=config.json model=my_flux data=my_latents repa.encoder_checkpoint=PATH
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

import lightning_repa.apps.hydra_config  # noqa: F401  (registers the schemas and resolvers)
from lightning_repa.apps.runtime import check_config, output_dir, run_app, say, torch_threads
from lightning_repa.apps.samples import ValidationGrids, grid_title, save_grid
from lightning_repa.callbacks.repa import RepaCallback

__all__ = ["main", "run"]

# The demo keeps the digits in memory and loads them in the main process on purpose; the
# last one is Lightning's own use of a deprecated torch API.
_QUIET = (r".*does not have many workers.*", r".*is smaller than the logging interval.*", r".*LeafSpec.*")


def run(cfg: DictConfig, overrides: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train with REPA as configured; return where things went and the last logged metrics.

    Checks the config first (values left ``???``, then ``RepaCallback.from_config(cfg.repa)``, so
    a bad REPA option such as ``repa.family=fluxx`` fails before anything is seeded, created or
    built), then seeds, builds the data module, the LightningModule, the loggers, a
    ``ModelCheckpoint`` and the Trainer, fits (resuming from ``cfg.ckpt_path`` when
    set), writes a sample grid into the output directory (and logs it to W&B), and prints one
    block saying where the logs, samples and checkpoints are.

    Returns a dict with ``output_dir``, ``global_step``, ``checkpoint`` (last.ckpt), ``samples``
    (PNG or None), ``wandb_dir`` (run directory or None), ``csv`` (metrics.csv or None) and
    ``metrics`` (the trainer's last logged values, as floats). `overrides`: the command line's
    overrides, read with `simpletuner_config` (see `alignment_callbacks`).
    """
    check_config(cfg)
    _check_shared_hyperparameters(cfg)
    callbacks = alignment_callbacks(cfg, overrides)  # option errors before anything is seeded or built
    import lightning_repa.demo  # noqa: F401  (registers the shipped digits teacher with timm)

    with torch_threads(cfg.torch_threads):
        return _run(cfg, callbacks)


def alignment_callbacks(cfg: DictConfig, overrides: Optional[Sequence[str]] = None) -> list[RepaCallback]:
    """The RepaCallbacks of a run: one from the `repa` node; or, with `simpletuner_config`, one per
    method the SimpleTuner file enables, with the `repa.<option>=value` overrides of the command line
    (`overrides`; under `@hydra.main` the run's own) laid on each."""
    if not cfg.get("simpletuner_config"):
        return [RepaCallback.from_config(cfg.repa)]
    from lightning_repa.simpletuner import simpletuner_options, with_overrides

    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    names = [o.split("=", 1)[0].lstrip("+~")[len("repa."):] for o in overrides if o.lstrip("+~").startswith("repa.")]
    repa = OmegaConf.to_container(cfg.repa, resolve=True, enum_to_str=True)
    given = {name: repa[name] for name in names}
    options = simpletuner_options(str(cfg.simpletuner_config), family=given.get("family"))
    return [RepaCallback(**o) for o in with_overrides(options, given)]


def _run(cfg: DictConfig, callbacks: list[RepaCallback]) -> dict[str, Any]:
    # One seed for the whole run: the global RNGs here (noise, timesteps, label dropout, the
    # projector's init); the demo's model.seed and data.seed follow ${seed} in their files.
    pl.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    model: pl.LightningModule = instantiate(cfg.model)
    checkpoint: ModelCheckpoint = instantiate(cfg.checkpoint)
    loggers: list[Logger] = [_logger(name, node) for name, node in (cfg.logger or {}).items() if node]
    grids = ValidationGrids(out / "samples", cfg.sample, callbacks) if cfg.sample.enabled else None
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, checkpoint, *([grids] if grids else [])],
                                      logger=loggers or False)

    hparams = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for logger in loggers:
        logger.log_hyperparams(hparams)

    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    result: dict[str, Any] = {
        "output_dir": out,
        "global_step": trainer.global_step,
        "checkpoint": Path(checkpoint.last_model_path) if checkpoint.last_model_path else None,
        "samples": None,
        "wandb_dir": None,
        "csv": None,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    if trainer.is_global_zero:
        result["samples"] = _save_samples(cfg, model, out, loggers, trainer.global_step, callbacks)
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                result["wandb_dir"] = _wandb_run_dir(logger)
            elif isinstance(logger, CSVLogger):
                result["csv"] = Path(logger.log_dir) / "metrics.csv"
        _print_summary(result)
    for logger in loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()  # a sweep runs its jobs in one process: one W&B run each
    return result


def _check_shared_hyperparameters(cfg: DictConfig) -> None:
    """With a logger, Lightning logs the LightningModule's and the LightningDataModule's
    hyperparameters as one dict and refuses a name they share with two values, but only once
    everything is built; say it first, naming both keys."""
    if not any(node for node in (cfg.logger or {}).values()):
        return
    model, data = (OmegaConf.to_container(cfg[k], resolve=True) if cfg.get(k) else {} for k in ("model", "data"))
    clashes = sorted(k for k in model.keys() & data.keys() if k != "_target_" and model[k] != data[k])
    if clashes:
        k = clashes[0]
        raise ValueError(
            f"`model.{k}`={model[k]!r} and `data.{k}`={data[k]!r} differ: with a logger on, Lightning logs both "
            "modules' hyperparameters as one dict and refuses a name with two values. Give both the same "
            f"value (model.{k}=<v> data.{k}=<v>; in the demo's files both follow `seed=N`) "
            "or run with logger=none"
        )


def _logger(name: str, node: DictConfig) -> Logger:
    if "_target_" not in node:
        raise ValueError(
            f"`logger.{name}` has no `_target_` (keys: {sorted(node)}); pick a file of logger/ or give one"
        )
    return instantiate(node)


def _save_samples(cfg: DictConfig, model: pl.LightningModule, output_dir: Path, loggers: list[Logger], step: int,
                  callbacks: list[RepaCallback]) -> Optional[Path]:
    if not cfg.sample.enabled:
        return None
    if not hasattr(model, "save_sample_grid"):
        say(f"(no sample grid: {type(model).__name__} has no `save_sample_grid`)")
        return None
    return save_grid(model, output_dir / cfg.sample.filename, cfg.sample, loggers, step, grid_title(step, callbacks))


def _wandb_run_dir(logger: WandbLogger) -> Optional[Path]:
    run = logger.experiment
    files_dir = getattr(run, "dir", None)  # <save_dir>/wandb/<offline-run-...>/files
    if not files_dir or getattr(getattr(run, "settings", None), "mode", "") == "disabled":
        return None
    return Path(files_dir).parent


def _print_summary(result: dict[str, Any]) -> None:
    m = result["metrics"]
    lines = [f"steps       {result['global_step']} optimizer steps"]
    if "repa/similarity" in m:
        lines.append(
            f"REPA        similarity {m['repa/similarity']:.3f}, weight {m.get('repa/weight', float('nan')):.3f}"
            + (f", train/loss {m['train/loss']:.4f}" if "train/loss" in m else "")
        )
    if result["wandb_dir"] is not None:
        offline = result["wandb_dir"].name.startswith("offline-run")
        hint = f"   (upload: wandb sync {result['wandb_dir']})" if offline else ""
        lines.append(f"W&B run     {result['wandb_dir']}{hint}")
    if result["csv"] is not None:
        lines.append(f"CSV log     {result['csv']}")
    if result["wandb_dir"] is None and result["csv"] is None:
        lines.append("logs        no W&B or CSV logger (logger=wandb, logger=csv or logger=[wandb,csv])")
    if result["samples"] is not None:
        lines.append(f"samples     {result['samples']}")
    if result["checkpoint"] is not None:
        lines.append(f"checkpoint  {result['checkpoint']}   (resume: ckpt_path=<this> trainer.max_steps=<more>)")
    lines.append(f"output dir  {result['output_dir']}")
    bar = "=" * 78
    say("\n".join(["", bar, "lightning-repa-train: done", *lines, bar]))


@hydra.main(version_base="1.3", config_path="pkg://lightning_repa.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Entry point of ``lightning-repa-train`` (see the module docstring)."""
    run_app("lightning-repa-train", run, cfg)


if __name__ == "__main__":
    main()
