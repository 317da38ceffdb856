"""What the three apps (train, probe, cache) share: the output directory, the required values,
torch's CPU thread count for the length of a run, and how a run reports a refused configuration."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf


def output_dir(cfg: DictConfig) -> Path:
    """`cfg.paths.output_dir`, resolved: Hydra's run directory under `@hydra.main`; composed without
    it (tests, notebooks) the path must be given."""
    if "${hydra:" in str(OmegaConf.to_container(cfg.paths)["output_dir"]):
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ValueError("`paths.output_dir` follows Hydra's run directory; without @hydra.main, set paths.output_dir=...")
    return Path(cfg.paths.output_dir).resolve()


def check_config(cfg: DictConfig) -> None:
    """Values left `???` in their config file are an error naming them (before anything is built)."""
    output_dir(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(
            f"required config values are not set (`???` in their config file): {', '.join(missing)}; "
            f"give them on the command line, e.g. {missing[0]}=<value>"
        )


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op CPU threads set to `threads` (None: unchanged) for the block, then restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def say(text: str) -> None:
    """A block of the app's report: through logging under `@hydra.main` (the console and the run's
    log), else printed (an app's `run` called from Python)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        logging.getLogger("lightning_repa").info(text)
    else:
        print(text, flush=True)


REFUSALS = (ValueError, TypeError, KeyError, IndexError, FileNotFoundError)
"""What a refused configuration raises: reported by its message alone, without a traceback."""


def run_app(app: str, run: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """An app's `run(cfg)` under `@hydra.main`. Lightning's log lines go to the run's log with the
    app's own; a refused configuration exits with status 2 and its message alone (`HYDRA_FULL_ERROR=1`
    shows the traceback), and a run directory that holds nothing but Hydra's own files is removed."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # they print on their own unless routed
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    if not sys.stdout.isatty():  # a redirected log: the progress bar moves every 50 batches, not every one
        os.environ.setdefault("TQDM_MINITERS", "50")  # Lightning's own setting (TQDMProgressBar)
    try:
        return run(cfg)
    except REFUSALS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _remove_empty_run_dir()
        message = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
        print(f"{app}: error: {message}\n(HYDRA_FULL_ERROR=1 shows where it was raised)", file=sys.stderr)
        raise SystemExit(2) from None


def _remove_empty_run_dir() -> None:
    """Remove the run directory Hydra made, and its empty parents up to the working directory, when it
    holds only Hydra's `.hydra` folder and empty logs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode is RunMode.MULTIRUN:
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    files = [p for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.relative_to(run_dir).parts]
    if any(p.stat().st_size for p in files):
        return
    logging.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    for parent in run_dir.parents:
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()
