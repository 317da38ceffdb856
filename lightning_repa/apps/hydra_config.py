"""Structured configs of the Hydra app (SPEC section 11), registered in Hydra's ConfigStore.

The ``repa`` node *is* :class:`~lightning_repa.config.RepaConfig` (every option is documented
there, once): ``repa/default.yaml`` starts from ``repa_schema``, so OmegaConf checks types and
choices when Hydra composes, before anything is built::

    lightning-repa-train repa.schedule=foo   # Invalid value 'foo', expected one of [constant, ...]
    lightning-repa-train repa.lam=abc        # Value 'abc' of type 'str' could not be converted to Float
    lightning-repa-train repa.bogus=1        # Key 'bogus' not in 'RepaConfig'

``AppConfig`` types the app's own small nodes (seed, resume path, sampling, paths); the
``_target_`` nodes (data, model, trainer, logger, checkpoint) are checked by the classes they
build. Importing this module (done by ``lightning_repa.conf`` and ``lightning_repa.apps.train``)
registers the schemas and the ``repa_demo_teacher`` resolver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from lightning_repa.config import RepaConfig

__all__ = ["AppConfig", "PathsConfig", "PrecomputeConfig", "SampleConfig", "demo_teacher_checkpoint", "register"]


@dataclass
class SampleConfig:
    """The sample grid written after training (``FlowMatchingDiT.save_sample_grid``)."""

    enabled: bool = True
    """Write the grid (skipped, with a note, when the model has no ``save_sample_grid``)."""
    filename: str = "samples.png"
    """File name inside the run's output directory."""
    steps: int = 20
    """Euler steps of the flow ODE from noise to image."""
    per_class: int = 8
    """Samples per class (one row per class)."""
    guidance: float = 2.0
    """Classifier-free guidance scale (1: plain conditional model)."""
    scale: int = 4
    """Nearest-neighbour upscaling of the grid, so 16-px digits are visible."""
    seed: int = 0
    """Seed of the sampling noise, so grids of different runs compare."""


@dataclass
class PathsConfig:
    output_dir: str = "${hydra:runtime.output_dir}"
    """Where checkpoints, logs and samples of this run go: Hydra's run directory (``hydra.run.dir``;
    one sub-directory per job with ``--multirun``). Set it when composing without ``@hydra.main``."""


@dataclass
class PrecomputeConfig:
    """``lightning-repa-cache``: which samples it encodes into ``repa.cache_dir`` and how."""

    split: str = "train"
    """The data module's loader to read: train, val or all (both)."""
    shard_size: int = 1024
    """Samples per shard file: a killed run loses at most the last unwritten shard; a rerun skips
    everything already written."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda[:N]."""
    max_batches: Optional[int] = None
    """Stop after this many batches of each loader (a partial cache, e.g. to try the settings)."""


@dataclass
class AppConfig:
    """The top level of ``config.yaml``."""

    repa: RepaConfig = field(default_factory=RepaConfig)
    """The callback's options (``RepaCallback.from_config(cfg.repa)``)."""
    data: Any = MISSING
    """A ``LightningDataModule`` (``_target_`` node, group ``data/``)."""
    model: Any = MISSING
    """The ``LightningModule`` that trains the denoiser (``_target_`` node, group ``model/``)."""
    trainer: Any = MISSING
    """``lightning.pytorch.Trainer`` arguments (group ``trainer/``)."""
    logger: Any = None
    """Loggers by name, each a ``_target_`` node (group ``logger/``; ``logger=[wandb,csv]`` picks two)."""
    checkpoint: Any = MISSING
    """The ``ModelCheckpoint`` callback (``_target_`` node)."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    """Read by ``lightning-repa-cache`` only (``lightning_repa/apps/precompute.py``)."""
    seed: int = 0
    """The run's seed: ``lightning.seed_everything`` (Python, NumPy, torch: noise, timesteps, the
    projector's init) before anything is built, and through ``${seed}`` the demo's ``model.seed``
    (initialisation) and ``data.seed`` (shuffle). The held-out split has its own fixed
    ``data.split_seed``, so runs of different seeds are scored on the same digits."""
    torch_threads: Optional[int] = None
    """``torch.set_num_threads`` before training (intra-op CPU threads); None keeps torch's default
    (one per core). Small CPU models run best on 1, and many threads on a busy machine are slower."""
    ckpt_path: Optional[str] = None
    """Resume from this checkpoint (e.g. ``.../checkpoints/last.ckpt``): the optimizer step, the
    REPA schedule and its cutoff state continue where they were."""
    simpletuner_config: Optional[str] = None
    """A SimpleTuner `config.json` / `config.toml`: the callbacks come from its crepa_ / urepa_ / irepa_ /
    layersync_ settings (`lightning_repa.from_simpletuner`), with the `repa.<option>=value` overrides of
    the command line laid on each; the rest of the `repa` node is not read."""
    task_name: str = "repa"
    """Names the run (output directory, W&B run name)."""


def demo_teacher_checkpoint() -> str:
    """Path of the shipped digits teacher (``${repa_demo_teacher:}`` in ``encoder/demo_vit.yaml``)."""
    from lightning_repa.demo.teacher import teacher_checkpoint_path  # registers the timm model too

    return str(teacher_checkpoint_path())


def register() -> None:
    """Store the schemas in Hydra's ConfigStore and register the resolver (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(group="repa", name="repa_schema", node=RepaConfig)
    cs.store(name="app_schema", node=AppConfig)
    if not OmegaConf.has_resolver("repa_demo_teacher"):
        OmegaConf.register_new_resolver("repa_demo_teacher", demo_teacher_checkpoint)


register()
