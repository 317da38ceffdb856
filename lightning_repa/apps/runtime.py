"""What the three apps (train, probe, cache) share: the output directory, the required values,
and torch's CPU thread count for the length of a run."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

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
