"""`RepaCallback`: Lightning's hooks around the Lightning-free alignment step (`lightning_repa.alignment`)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_repa.alignment import AlignmentStep, StepResult
from lightning_repa.callbacks.attach import (PROJECTOR_ATTR, attach, batch_latents, check_projector_trains,
                                             frozen_message, log_prefixes)
from lightning_repa.callbacks.cknna import HeldOutCknna
from lightning_repa.callbacks.checkpoint import (add_optimizer_entries, changes, find_state, prepare_projector,
                                                 record_projectors, saved_settings, settings, teacher_name)
from lightning_repa.callbacks.metrics import StepMetrics
from lightning_repa.callbacks.training_step import AlignedTrainingStep
from lightning_repa.config import RepaConfig, resolve
from lightning_repa.maths.schedule import Cutoff
from lightning_repa.models.surgery import InstanceWrappers, require_denoiser
from lightning_repa.teachers.build import load_config_encoder
from lightning_repa.teachers.protocol import TeacherProtocol


class RepaCallback(Callback):
    r"""Adds representation alignment (REPA and its relatives: the method and the teacher come from the
    options) to a LightningModule that trains a diffusers denoiser.

    In ``setup`` the trainable projector is attached to the module (as ``repa_projector``: the optimizer,
    checkpoints and DDP see it) and ``training_step`` is wrapped; in ``on_fit_start`` forward hooks go
    on the chosen block. Each step :class:`~lightning_repa.alignment.AlignmentStep` compares the
    block's image tokens with the teacher's tokens of the clean batch and ``weight * loss`` is added
    to the step's loss, before backward. After each optimizer step the schedule, the similarity EMA
    and the cutoff advance and ``repa/*`` is logged through ``pl_module.log``.

    Args:
        config: a :class:`~lightning_repa.config.RepaConfig`; or its fields as keyword arguments
            (``RepaCallback(family="flux", block_index=8, lam=0.5)``). Every option is documented
            once, in ``RepaConfig``.

    Raises:
        TypeError: an unknown option (the closest valid name is suggested).
        ValueError: bad option values or combinations, at construction; a denoiser of the wrong
            class or a missing VAE, at setup; a block index out of range (``IndexError``), a
            projector outside the optimizer and a missing batch key (``KeyError``), before the first
            optimizer step.

    Batch: a mapping with the clean training-space latents under ``latents_key`` ((B, C, h, w), or
    (B, C, T, h, w) for video), and the clean images under ``pixels_key`` with ``decoder="pixels"``.
    Manual optimization: ``loss = loss + repa.compute_loss(batch)`` before ``manual_backward``.

    Observing: ``last_result`` (a :class:`~lightning_repa.alignment.StepResult`) holds the last
    micro-batch's weight, loss, similarity and method terms; ``step.listeners`` are called with the
    inputs of every aligned micro-batch (:class:`~lightning_repa.alignment.StepInputs`). A step whose
    tokens or loss are not finite adds no alignment loss on any rank (``repa/skipped``);
    ``max_nonfinite_steps`` such steps in a row stop the run.

    Example::

        trainer = L.Trainer(max_steps=10_000, callbacks=[
            RepaCallback(family="flux", block_index=8, lam=0.5, encoder="dinov2_vits14",
                         encoder_checkpoint="dinov2_vits14.pth", decoder="vae")])
        trainer.fit(flux_module, datamodule)
    """

    def __init__(self, config: Optional[RepaConfig] = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("give either `config` or keyword options, not both")
        self.config = cfg = config.validate() if config is not None else RepaConfig.from_options(**options)
        self.resolved = resolve(cfg)
        self.family, self.method, self.block_index = self.resolved.family, self.resolved.method, self.resolved.block_index
        self.step = AlignmentStep(self.block_index, self.resolved.objective)
        self.cutoff = Cutoff(cfg.cutoff_step, cfg.similarity_threshold, cfg.similarity_ema_decay, cfg.threshold_mode)
        self.metrics = StepMetrics(cfg.max_nonfinite_steps)
        self._cknna = HeldOutCknna(cfg.cknna_every_n_steps)
        self.projector_attr, self.log_prefix = PROJECTOR_ATTR, "repa"  # numbered / `repa/<name>` beside others
        self._aligned: Optional[AlignedTrainingStep] = None  # this fit's alignment inside training_step
        self._wrappers: Optional[InstanceWrappers] = None
        self._built_encoder: Optional[nn.Module] = None
        self._attached = self._created_projector = self._checked_gradients = False
        self._fresh_projector: Optional[dict[str, Any]] = None  # a checkpoint without it, to complete
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, cfg: Any) -> "RepaCallback":
        """From a RepaConfig, a dict or an OmegaConf node (the Hydra app's `repa` node)."""
        return cls(RepaConfig.from_node(cfg))

    @property
    def objective(self) -> Any:
        """The method's objective (`lightning_repa.objectives`)."""
        return self.step.objective

    @property
    def teacher(self) -> Optional[TeacherProtocol]:
        """The teacher, built when the projector is attached (in `setup`)."""
        return self.step.teacher

    @property
    def denoiser(self) -> Optional[nn.Module]:
        """The (unwrapped) denoiser whose blocks are hooked, from fit start."""
        capture = None if self._aligned is None else self._aligned.capture
        return None if capture is None else capture.denoiser

    @property
    def teacher_name(self) -> str:
        """The teacher's one name, in logs and in the state key: the encoder, or `backbone<block>`."""
        return teacher_name(self.config)

    @property
    def state_key(self) -> str:
        key = {"family": self.family.name, "block_index": self.block_index, "teacher": self.teacher_name}
        return self._generate_state_key(**key, **({"name": self.config.name} if self.config.name else {}))

    def build_encoder(self) -> nn.Module:
        """The frozen image encoder: (B, 3, H, W) in [0, 1] -> (B, gh*gw, D), with `embed_dim` and
        `grid_for(H, W)`. Override to use an encoder that timm does not provide."""
        return load_config_encoder(self.config)

    def build_encoder_once(self) -> nn.Module:
        """`build_encoder()`, called at most once (the encoder is kept for later fits)."""
        if self._built_encoder is None:
            self._built_encoder = self.build_encoder()
        return self._built_encoder

    # --- setup: projector, teacher and the training_step wrapper ----------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Wrap `configure_model` (the projector and the teacher are attached right after it) and `training_step`."""
        if stage != "fit":
            return
        mine = [cb for cb in trainer.callbacks if isinstance(cb, RepaCallback)]
        self.projector_attr = PROJECTOR_ATTR if len(mine) == 1 else f"{PROJECTOR_ATTR}_{mine.index(self)}"
        self.log_prefix = log_prefixes([(cb.config.name, cb.teacher_name) for cb in mine])[mine.index(self)]
        self.cutoff.reset()  # a fit starts fresh; a resumed one gets its state back from the checkpoint
        self.metrics.reset_counts()
        self._wrappers = InstanceWrappers(pl_module)
        self._aligned = AlignedTrainingStep(self, trainer, pl_module, self._warn_once)
        configure, load = pl_module.configure_model, pl_module.on_load_checkpoint

        def configure_model() -> None:  # a plain closure: `is_overridden` must not unwrap it
            configure()
            self._created_projector, self._attached = attach(self, pl_module), True

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:  # before the module's weights load
            load(checkpoint)
            fresh = prepare_projector(self, pl_module, checkpoint, sole=len(mine) == 1)
            self._fresh_projector = checkpoint if fresh else None

        # After LM.setup and the module's own configure_model, before the checkpoint restore,
        # configure_optimizers and DDP: the denoiser and the VAE exist, the optimizer does not yet.
        self._wrappers.install("configure_model", configure_model)
        self._wrappers.install("on_load_checkpoint", on_load_checkpoint)
        self._wrappers.install("training_step", self._aligned.wrap(pl_module.training_step))

    # --- fit start: hooks, gate ------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizer holds the projector, build the gate, put the hooks on the blocks."""
        cfg = self.config
        if not self._attached:  # configure_model was bypassed (a strategy that does not call it)
            self._created_projector, self._attached = attach(self, pl_module), True
        projector = getattr(pl_module, self.projector_attr)
        check_projector_trains(projector, self.projector_attr, trainer.optimizers)
        if self._fresh_projector is not None:  # the optimizer states load after this hook
            add_optimizer_entries(self._fresh_projector, projector, trainer.optimizers)
            self._fresh_projector = None
        schedule = self._aligned.start(require_denoiser(pl_module, self.family, cfg.denoiser))
        self.teacher.to(pl_module.device)
        self.teacher.set_autocast(torch.bfloat16 if "bf16" in str(trainer.precision) else None)
        self.metrics.to(pl_module.device).reset()
        self._checked_gradients = False
        self._cknna.reset()
        blocks = len(self._aligned.capture.blocks)
        rank_zero_info(f"REPA: family={self.family.name}, block {self.block_index} of {blocks}, method="
                       f"{self.method.value}, teacher={cfg.teacher.value}, projector={cfg.projector.value}, {schedule}")

    def compute_loss(self, batch: Mapping[str, Any]) -> Tensor:
        """The weighted alignment loss of this micro-batch (a scalar); with manual optimization, call it
        after the denoiser's forward and add it to the loss before `manual_backward`."""
        return self._aligned.compute_loss(batch)

    @property
    def last_result(self) -> Optional[StepResult]:
        """The last micro-batch's outcome (weight, loss, similarity, method terms, skipped)."""
        return None if self._aligned is None else self._aligned.last_result

    def _warn_once(self, key: str, condition: bool, message: str) -> None:
        if condition and key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"REPA: {message}")

    # --- the optimizer step ----------------------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Check the projector got gradients (every rank decides together); while the loss is off, drop its
        (zero) gradients so that momentum and weight decay (AdamW) skip it, as they skip any parameter without one."""
        params = list(getattr(pl_module, self.projector_attr).parameters())
        if self.metrics.aligned and not self._checked_gradients:  # the same on every rank
            self._checked_gradients = True
            local = [p for p in params if p.numel()]  # under FSDP a rank may hold none of the projector
            starved = bool(local) and all(p.grad is None for p in local)
            if trainer.strategy.reduce_boolean_decision(starved, all=False):
                raise RuntimeError(frozen_message(self.projector_attr, "received no gradient in the first aligned step"))
        if not self.metrics.aligned:
            for p in params:
                p.grad = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Once per optimizer step: fold the similarity into the EMA and the cutoff, and log `repa/*`."""
        logs = self._aligned.close_step()
        for name, value in (logs or {}).items():
            pl_module.log(f"{self.log_prefix}/{name}", value, on_step=True, on_epoch=False,
                          prog_bar=name in ("similarity", "weight"), batch_size=1)

    # --- diagnostics: CKNNA on a held-out batch --------------------------------------------------
    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Arm the capture (without gradients) on the first validation batch when `repa/cknna` is due."""
        capture = None if self._aligned is None else self._aligned.capture
        if self.config.cknna_every_n_steps and not trainer.sanity_checking and capture is not None:
            self._cknna.arm(trainer.global_step, batch_idx, dataloader_idx, capture, self.family,
                            batch_latents(batch, self.config))

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Log `repa/cknna`: projected student vs teacher tokens, pooled per sample, on the armed batch."""
        if self._cknna.grid is None:
            return
        value = self._cknna.measure_batch(trainer.global_step, self._aligned.capture, self.step, batch,
                                          batch_latents(batch, self.config), getattr(pl_module, self.projector_attr))
        self._warn_once("cknna", value is None, "`cknna_every_n_steps` needs a validation_step that calls the "
                        "denoiser on batches of at least 4 samples; no `repa/cknna` is logged")
        if value is not None:
            pl_module.log(f"{self.log_prefix}/cknna", value, on_step=False, on_epoch=True, batch_size=1)

    # --- teardown --------------------------------------------------------------------------------
    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the hooks and the wrappers, and a projector this fit attached before any optimizer step."""
        if self._created_projector and trainer.global_step == 0 and hasattr(pl_module, self.projector_attr):
            delattr(pl_module, self.projector_attr)
        self._cleanup()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks and the wrappers at the end of fit."""
        if stage == "fit":
            self._cleanup()

    def _cleanup(self) -> None:
        if self._aligned is not None:
            self._aligned.clear()
        if self._wrappers is not None:
            self._wrappers.remove()
        self._attached = self._created_projector = False

    # --- checkpoint ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """The cutoff's EMA, latch and settings, the count of skipped steps and the run's settings."""
        return {"cutoff": self.cutoff.state_dict(), "metrics": self.metrics.state_dict(), "settings": settings(self)}

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Note which optimizer entries are the projector's (`strip_projectors` removes them)."""
        record_projectors(checkpoint, self.projector_attr, getattr(pl_module, self.projector_attr), trainer.optimizers)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Find this callback's state, also where an earlier version or other settings keyed it."""
        states = checkpoint.get("callbacks") or {}
        key = find_state(self, states, sole=self.projector_attr == PROJECTOR_ATTR)
        if key is not None and key != self.state_key:
            old = states.pop(key)
            states[self.state_key] = {**old, "settings": saved_settings(key, old)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the cutoff and the skip count; warn when settings differ from the checkpoint's."""
        changed = [*changes(state_dict.get("settings", {}), settings(self)), *self.cutoff.load_state_dict(
            state_dict["cutoff"])]
        self.metrics.load_state_dict(state_dict.get("metrics", {}))
        if changed:
            rank_zero_warn(f"REPA ({self.state_key}): resuming with settings that differ from the checkpoint's "
                           f"({'; '.join(changed)}); the saved EMA, latch and projector are kept and the new settings "
                           "apply from now on")
