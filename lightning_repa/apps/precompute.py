"""The teacher-feature cache ahead of training: ``lightning-repa-cache`` (``python -m lightning_repa.apps.precompute``).

``main()`` is the ``@hydra.main`` shim over ``conf/cache.yaml`` (the training app's config with
``repa.cache=disk``); ``run(cfg)`` does the work and is what tests call. It builds the data module
and the LightningModule as training would (the module holds the VAE for ``decoder=vae``), the
teacher with its disk store exactly as ``RepaCallback`` does, and runs every sample of the chosen
loaders through it (a DataLoader is read in order, with its last partial batch): samples already in the cache are skipped (so a rerun resumes), the rest are
decoded, encoded and written in shards of ``precompute.shard_size``. Under torchrun each rank takes
every ``WORLD_SIZE``-th batch::

    lightning-repa-cache experiment=demo repa.cache_dir=cache/digits
    lightning-repa-train experiment=demo repa.cache=disk repa.cache_dir=cache/digits
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Iterator, Mapping

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import lightning_repa.apps.hydra_config  # noqa: F401  (registers the schemas and resolvers)
from lightning_repa.apps.runtime import check_config, run_app, say, torch_threads
from lightning_repa.choices import Cache
from lightning_repa.config import RepaConfig, resolve
from lightning_repa.teachers.build import build_teacher, load_config_encoder
from lightning_repa.teachers.cache import CachedTeacher, DiskStore

__all__ = ["main", "precompute", "run"]

SPLITS = ("train", "val", "all")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fill `cfg.repa.cache_dir` with the teacher features of the configured data module.

    Returns ``cache_dir``, ``samples`` (seen by this rank), ``computed``, ``cached`` (already
    there), ``entries`` (in the cache now) and ``seconds``.
    """
    check_config(cfg)
    cache = Cache.parse(cfg.repa.get("cache", "none"), "repa.cache")
    if cache is not Cache.disk:
        raise ValueError(f"lightning-repa-cache writes a disk cache: keep repa.cache=disk (got repa.cache="
                         f"{cache.value}) and give repa.cache_dir=PATH, the directory training reads")
    if not cfg.repa.get("cache_dir"):
        raise ValueError("lightning-repa-cache needs the cache directory: repa.cache_dir=PATH (the same as in training)")
    config = RepaConfig.from_node(cfg.repa)  # every option checked before anything is built
    options = cfg.precompute
    if options.split not in SPLITS:
        raise ValueError(f"`precompute.split` can be {', '.join(SPLITS)}, got {options.split!r}")
    if options.shard_size < 1:
        raise ValueError(f"`precompute.shard_size` must be >= 1, got {options.shard_size}")
    import lightning_repa.demo  # noqa: F401  (registers the shipped digits teacher with timm)

    with torch_threads(cfg.torch_threads):
        pl.seed_everything(cfg.seed, workers=True)
        datamodule: pl.LightningDataModule = instantiate(cfg.data)
        module: pl.LightningModule = instantiate(cfg.model)
        module.configure_model()  # a module that builds its networks (and VAE) there
        teacher = build_teacher(config, resolve(config).family, module, lambda: load_config_encoder(config))
        if not isinstance(teacher, CachedTeacher) or not isinstance(teacher.store, DiskStore):
            raise TypeError(f"lightning-repa-cache: the configuration built a {type(teacher).__name__}, not a disk cache")
        teacher.store.shard_size = options.shard_size
        device = _device(options.device)
        teacher.to(device)
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        return precompute(teacher, _loaders(datamodule, options.split), config.latents_key, device, rank, world,
                          options.max_batches)


def precompute(teacher: CachedTeacher, loaders: Iterable[Iterable[Mapping[str, Any]]], latents_key: str,
               device: torch.device, rank: int = 0, world: int = 1, max_batches: int | None = None) -> dict[str, Any]:
    """Run each loader's batches (every `world`-th, from `rank`) through the caching teacher."""
    store: DiskStore = teacher.store
    start, before = time.perf_counter(), len(store)
    try:
        computed, samples = _run_loaders(teacher, loaders, latents_key, device, rank, world, max_batches)
    finally:
        store.flush()  # an interrupted run keeps what it computed
    result = {"cache_dir": store.root, "samples": samples, "computed": computed, "cached": samples - computed,
              "entries": len(store), "seconds": time.perf_counter() - start}
    say(f"lightning-repa-cache: {samples} samples read, {computed} computed, {samples - computed} already cached; "
          f"{result['entries']} entries in {store.root} (was {before}); {result['seconds']:.1f} s")
    return result


def _run_loaders(teacher: CachedTeacher, loaders: Iterable[Iterable[Mapping[str, Any]]], latents_key: str,
                 device: torch.device, rank: int, world: int, max_batches: int | None) -> tuple[int, int]:
    samples = computed = 0
    for loader in loaders:
        total = len(loader) if hasattr(loader, "__len__") else None
        if max_batches is not None and total is not None:
            total = min(total, max_batches)
        bar = tqdm(_mine(loader, rank, world, max_batches), total=_share(total, rank, world), unit="batch",
                   desc=f"teacher cache (rank {rank}/{world})", disable=None)
        for batch in bar:
            if latents_key not in batch:
                raise KeyError(f"the batch has no `latents_key`={latents_key!r} (keys: {sorted(batch)})")
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            misses = teacher.misses
            teacher(batch, batch[latents_key])
            samples += batch[latents_key].shape[0]
            computed += teacher.misses - misses
            bar.set_postfix(computed=computed, cached=samples - computed)
    return computed, samples


def _loaders(datamodule: pl.LightningDataModule, split: str) -> list[Iterable[Mapping[str, Any]]]:
    datamodule.prepare_data()
    datamodule.setup("fit")
    loaders = []
    if split in ("train", "all"):
        loaders.append(datamodule.train_dataloader())
    if split in ("val", "all"):
        loaders.append(datamodule.val_dataloader())
    return [_every_sample(loader) for loader in loaders]


def _every_sample(loader: Any) -> Any:
    """A DataLoader again, in order and keeping the last partial batch (training loaders shuffle and
    often drop it); anything else as it is."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, drop_last=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def _mine(loader: Iterable[Any], rank: int, world: int, max_batches: int | None) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        if i % world == rank:
            yield batch


def _share(total: int | None, rank: int, world: int) -> int | None:
    return None if total is None else len(range(rank, total, world))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@hydra.main(version_base="1.3", config_path="pkg://lightning_repa.conf", config_name="cache")
def main(cfg: DictConfig) -> None:
    """Entry point of ``lightning-repa-cache`` (see the module docstring)."""
    run_app("lightning-repa-cache", run, cfg)


if __name__ == "__main__":
    main()
