"""`RepaCallback`: the thin Lightning glue around capture, teacher, projector, objective and gate."""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_repa.align import per_frame
from lightning_repa.attach import (
    attach_projector,
    batch_latents,
    check_projector_trains,
    frozen_message,
    log_prefixes,
    require_denoiser,
)
from lightning_repa.capture import BlockCapture
from lightning_repa.config import Method, RepaConfig, Teacher
from lightning_repa.decoders import drop_vae_encoder
from lightning_repa.encoders import load_encoder
from lightning_repa.families import get_family
from lightning_repa.kernel_alignment import cknna
from lightning_repa.objectives import AlignResult, build_objective
from lightning_repa.schedule import Cutoff, Gate, StepPlan, WeightSchedule
from lightning_repa.step_metrics import StepMetrics, StepRecord, StepResult, nonfinite
from lightning_repa.surgery import InstanceWrappers, get_path, plain_tensor_init
from lightning_repa.teacher import TeacherProtocol, build_teacher

PROJECTOR_ATTR = "repa_projector"


class RepaCallback(Callback):
    r"""Adds representation alignment (REPA, U-REPA, CREPA, iREPA, LayerSync) to a LightningModule that trains a
    diffusers denoiser.

    In ``setup`` the trainable projector is attached to the module (as ``repa_projector``, so
    ``configure_optimizers`` over ``self.parameters()``, checkpoints and DDP see it), together with
    the teacher, and the module's ``training_step`` is wrapped; in ``on_fit_start`` forward hooks
    are put on the chosen block. Each step the hook captures that block's image tokens, the teacher
    gives its tokens for the clean batch, the method's objective (``lightning_repa.objectives``)
    compares them, and ``weight * objective`` is added to the loss the step returns, so it reaches
    backward (divided by ``accumulate_grad_batches`` like the rest of the loss). After each
    optimizer step the schedule, the similarity EMA and the cutoff advance and ``repa/*`` is logged
    through ``pl_module.log``.

    Args:
        config: a :class:`~lightning_repa.config.RepaConfig`; or give its fields as keyword
            arguments (``RepaCallback(family="flux", block_index=8, lam=0.5)``). Every option is
            documented once, in ``RepaConfig``.

    Raises:
        TypeError: unknown option (the closest valid name is suggested).
        ValueError: bad option values or combinations (``RepaConfig.validate``), at construction;
            a denoiser of the wrong class or a missing VAE, at setup; block index out of range
            (``IndexError``), a projector outside the optimizer, and a missing batch key
            (``KeyError``), before the first optimizer step.

    Batch: a mapping with the clean training-space latents under ``latents_key`` (B, C, h, w),
    and the clean images under ``pixels_key`` when ``decoder="pixels"``.

    Manual optimization: call ``loss = loss + repa.compute_loss(batch)`` in ``training_step``
    after the denoiser's forward and before ``manual_backward`` (``repa`` being this callback).

    Observing a step: ``last_result`` (a :class:`~lightning_repa.step_metrics.StepResult`) holds the
    last micro-batch's weight, loss, similarity, method terms and whether it was skipped.

    A step whose teacher tokens, student tokens or loss are not finite adds no alignment loss on
    any rank (``repa/skipped``); ``max_nonfinite_steps`` such steps in a row stop the run.

    Example::

        trainer = L.Trainer(max_steps=10_000, callbacks=[
            RepaCallback(family="flux", block_index=8, lam=0.5, encoder="dinov2_vits14",
                         encoder_checkpoint="dinov2_vits14.pth", decoder="vae")])
        trainer.fit(flux_module, datamodule)
    """

    def __init__(self, config: Optional[RepaConfig] = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("give either `config` or keyword options, not both")
        self.config = config.validate() if config is not None else RepaConfig.from_options(**options)
        cfg = self.config
        self.family = get_family(cfg.family)
        self.method = cfg.method or self.family.method
        self.block_index = self.family.default_block_index if cfg.block_index is None else cfg.block_index
        self.objective = build_objective(self.method, cfg)
        self.cutoff = Cutoff(cfg.cutoff_step, cfg.similarity_threshold, cfg.similarity_ema_decay, cfg.threshold_mode)
        self.gate: Optional[Gate] = None
        self.teacher: Optional[TeacherProtocol] = None
        self.last_result: Optional[StepResult] = None
        self.projector_attr = PROJECTOR_ATTR
        self._denoiser: Optional[nn.Module] = None
        self._capture: Optional[BlockCapture] = None
        self._module: Optional[pl.LightningModule] = None
        self._trainer: Optional[pl.Trainer] = None
        self._wrappers: Optional[InstanceWrappers] = None
        self._built_encoder: Optional[nn.Module] = None
        self._attached = False  # projector and teacher attached in this fit
        self.metrics = StepMetrics(cfg.max_nonfinite_steps)
        self.log_prefix = "repa"  # `repa/<name>` when several REPA callbacks log
        self._created_projector = False  # this fit attached a new projector
        self._checked_gradients = False
        self._warned: set[str] = set()
        self._logged: dict[str, float] = {}  # the last step's logged values
        self._last_cknna: Optional[int] = None  # optimizer step of the last `repa/cknna`
        self._cknna_grid: Optional[tuple[int, ...]] = None  # armed on a validation batch
        self._plan: Optional[StepPlan] = None  # plan of the optimizer step in flight
        self._record: Optional[StepRecord] = None  # the micro-batch in flight
        self._manual_called = False

    @classmethod
    def from_config(cls, cfg: Any) -> "RepaCallback":
        """From a RepaConfig, a dict or an OmegaConf node (the Hydra app's `repa` node)."""
        if isinstance(cfg, RepaConfig):
            return cls(cfg)
        from omegaconf import DictConfig, OmegaConf  # ships with hydra-core

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        return cls(**{k: v for k, v in dict(cfg).items() if k != "_target_"})

    @property
    def state_key(self) -> str:
        cfg = self.config
        teacher = cfg.encoder if cfg.teacher is Teacher.encoder else f"block {cfg.teacher_block_index}"
        return self._generate_state_key(family=self.family.name, block_index=self.block_index, teacher=teacher)

    @property
    def student_indices(self) -> list[int]:
        if self.config.teacher is Teacher.backbone:
            return [self.block_index, self.config.teacher_block_index]
        return [self.block_index]

    # --- extension point -----------------------------------------------------
    def build_encoder(self) -> nn.Module:
        """The frozen image encoder: (B, 3, H, W) in [0, 1] -> (B, gh*gw, D), with `embed_dim`
        and `grid_for(H, W)`. Override to use an encoder that timm does not provide."""
        cfg = self.config
        return load_encoder(cfg.encoder, image_size=cfg.encoder_image_size, checkpoint=cfg.encoder_checkpoint)

    def _encoder(self) -> nn.Module:
        if self._built_encoder is None:
            self._built_encoder = self.build_encoder()
        return self._built_encoder

    # --- setup: projector, teacher and the training_step wrapper ----------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Wrap `configure_model` (the projector and the teacher are attached right after it) and `training_step`."""
        if stage != "fit":
            return
        self._trainer, self._module = trainer, pl_module
        mine = [cb for cb in trainer.callbacks if isinstance(cb, RepaCallback)]
        self.projector_attr = PROJECTOR_ATTR if len(mine) == 1 else f"{PROJECTOR_ATTR}_{mine.index(self)}"
        self.log_prefix = log_prefixes([(cb.config.name, cb.teacher_name) for cb in mine])[mine.index(self)]
        self._wrappers = InstanceWrappers(pl_module)
        original = pl_module.configure_model

        def configure_model() -> None:  # a plain closure: `is_overridden` must not unwrap it
            original()
            self._attach(pl_module)

        # After LM.setup and the module's own configure_model, before the checkpoint restore,
        # configure_optimizers and DDP: the denoiser and the VAE exist, the optimizer does not yet.
        self._wrappers.install("configure_model", configure_model)
        self._wrappers.install("training_step", self._wrap_training_step(pl_module.training_step))

    @property
    def teacher_name(self) -> str:
        """The encoder's name, or `backbone<teacher_block_index>`."""
        cfg = self.config
        return cfg.encoder if cfg.teacher is Teacher.encoder else f"backbone{cfg.teacher_block_index}"

    def _attach(self, pl_module: pl.LightningModule) -> None:
        cfg = self.config
        if cfg.drop_vae_encoder:  # before the optimizer and the checkpoint restore
            drop_vae_encoder(get_path(pl_module, cfg.vae_attr), cfg.vae_attr)
        denoiser = require_denoiser(pl_module, self.family, cfg.denoiser)
        with plain_tensor_init():  # the encoder is built once; the decoder reads this module's VAE
            self.teacher = build_teacher(cfg, self.family, pl_module, self._encoder)
        hidden = self.family.hidden_size(denoiser)
        out_dim = self.teacher.embed_dim or hidden
        self._created_projector = attach_projector(
            pl_module, self.projector_attr, cfg, hidden, out_dim, next(denoiser.parameters()).device, self.teacher_name
        )
        self._attached = True

    def _wrap_training_step(self, original: Any) -> Any:
        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            if not self._trainer.training:  # e.g. a validation_step that reuses training_step
                return original(*args, **kwargs)
            batch = args[0] if args else kwargs["batch"]
            self._begin_step(batch)
            try:
                output = original(*args, **kwargs)
            except BaseException:
                self._capture.clear()
                raise
            return self._end_step(batch, output)

        return training_step

    # --- fit start: hooks, gate -----------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizer holds the projector, build the gate, put the hooks on the blocks."""
        cfg = self.config
        if not self._attached:  # configure_model was bypassed (a strategy that does not call it)
            self._attach(pl_module)
        denoiser = self._denoiser = require_denoiser(pl_module, self.family, cfg.denoiser)
        self._capture = BlockCapture(denoiser, self.family, self.student_indices, cfg.align_call)
        check_projector_trains(getattr(pl_module, self.projector_attr), self.projector_attr, trainer.optimizers)
        schedule = WeightSchedule(
            cfg.schedule, cfg.lam, cfg.warmup_steps, cfg.decay_steps, cfg.lambda_end, cfg.power, trainer.max_steps
        )
        self.gate = Gate(schedule, self.cutoff)
        self.teacher.to(pl_module.device)
        self.teacher.set_autocast(torch.bfloat16 if "bf16" in str(trainer.precision) else None)
        self.metrics.to(pl_module.device).reset()
        self._checked_gradients = False
        self._last_cknna = self._cknna_grid = None
        self._capture.attach()
        rank_zero_info(
            f"REPA: family={self.family.name}, block {self.block_index} of {len(self._capture.blocks)}, "
            f"method={self.method.value}, teacher={cfg.teacher.value}, projector={cfg.projector.value}, {schedule}"
        )

    # --- each micro-batch ---------------------------------------------------------
    def _begin_step(self, batch: Any) -> None:
        latents = batch_latents(batch, self.config)
        step = self._trainer.global_step
        if self._plan is None or self._plan.step != step:  # first micro-batch of this optimizer step
            self._plan = self.gate.plan(step)
            self.metrics.reset()
        grid = self.family.grid(latents.shape, self._denoiser) if self._plan.measure else None
        self._record = StepRecord(self._plan, latents, grid)
        self._manual_called = False
        if grid is not None:
            self._capture.arm(math.prod(grid))
        else:
            self._capture.clear()

    def _end_step(self, batch: Any, output: Any) -> Any:
        if not self._module.automatic_optimization:
            if self._record.plan.measure and not self._manual_called:
                raise RuntimeError(
                    "with manual optimization, call `loss = loss + repa.compute_loss(batch)` in training_step "
                    "before manual_backward (repa: the RepaCallback instance)"
                )
            return output
        if output is None:  # the step was skipped
            self._capture.clear()
            return None
        aux = self.compute_loss(batch)
        if isinstance(output, Tensor):
            return output + aux.to(output.dtype)
        if isinstance(output, Mapping) and "loss" in output:
            return {**output, "loss": output["loss"] + aux.to(output["loss"].dtype)}
        raise TypeError(f"training_step must return a loss tensor or a dict with 'loss' for REPA, got {type(output).__name__}")

    def compute_loss(self, batch: Mapping[str, Any]) -> Tensor:
        """The weighted alignment loss of this micro-batch (a scalar); call it after the denoiser's forward."""
        self._manual_called = True
        record = self._record
        projector = getattr(self._module, self.projector_attr)
        zero = torch.zeros((), device=self._module.device)
        if self._trainer.world_size > 1:  # every projector parameter in the graph, so that
            # DDP(find_unused_parameters=False) also works on steps without alignment (weight 0, cutoff, skipped)
            zero = sum((p.sum() for p in projector.parameters()), zero) * 0.0
        weight = record.plan.weight
        if not record.plan.measure:
            self._capture.clear()
            return self._finish(record, zero, None)
        captured = self._capture.take_all(record.grid)
        self._warn_about_several_calls()
        student, grid_s = per_frame(captured[self.block_index], record.grid)  # (B, N, hidden) or (B, T', N, hidden)
        teacher, grid_t = per_frame(*self.teacher(batch, record.latents, captured))  # (B, M, D) or (B, T', M, D)
        if student.shape[:-2] != teacher.shape[:-2]:
            raise ValueError(
                f"the student has {tuple(student.shape[1:-2])} frames and the teacher {tuple(teacher.shape[1:-2])}: "
                f"family={self.family.name!r} with a temporal patch size > 1 is not supported"
            )
        if self.method is Method.crepa:
            self.objective.temporal_ratio = getattr(self.teacher, "temporal_ratio", None)
        with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
            result = self.objective(student, grid_s, teacher, grid_t, projector)
        bad = None  # non-finite tokens make the loss non-finite: one check (one host sync) per step
        if nonfinite(("the alignment loss", result.loss)) is not None:
            bad = nonfinite(("the teacher tokens", teacher), ("the student tokens", student)) or "the alignment loss"
        bad = self._agree(bad)
        if bad is not None:  # this step adds no alignment loss, on every rank
            self._skip(record.plan.step, bad)
            return self._finish(record, zero, None)
        self.metrics.aligned |= weight > 0
        loss = zero + weight * result.loss if weight > 0 else zero
        return self._finish(record, loss, result)

    def _agree(self, bad: Optional[str]) -> Optional[str]:
        """Every rank skips when one has to (one all-reduce, only when training on several processes)."""
        if self._trainer.world_size <= 1:
            return bad
        flag = torch.tensor(float(bad is not None), device=self._module.device)
        if float(self._trainer.strategy.reduce(flag, reduce_op="sum")) > 0 and bad is None:
            return "another rank's tokens or alignment loss"
        return bad

    def _skip(self, step: int, what: str) -> None:
        self.metrics.skipped = what
        if "skip" not in self._warned:
            self._warned.add("skip")
            rank_zero_warn(
                f"REPA: {what} of optimizer step {step} are not finite; that step adds no alignment loss (the rest of "
                f"the loss and its gradients are untouched). Such steps are counted in `{self.log_prefix}/skipped`; "
                f"{self.config.max_nonfinite_steps} in a row stop the run (`max_nonfinite_steps`)"
            )

    def _warn_about_several_calls(self) -> None:
        calls = self._capture.grad_calls
        if calls > 1 and self.config.align_call == "first" and "calls" not in self._warned:
            self._warned.add("calls")
            rank_zero_warn(
                f"REPA: the denoiser ran {calls} times with gradients in one training step; the first call is aligned "
                "(align_call='first'). Set align_call='last', or a predicate on the call's arguments, to choose another"
            )

    def _finish(self, record: StepRecord, loss: Tensor, result: Optional[AlignResult]) -> Tensor:
        plan = record.plan
        self.last_result = StepResult(plan.step, plan.weight, plan.measure, loss.detach())
        if result is not None:
            self.last_result.similarity, self.last_result.terms = result.similarity, result.terms
        self.last_result.skipped = self.metrics.skipped is not None and result is None and plan.measure
        if plan.measure:  # an unmeasured step's loss is 0: nothing to average (or to sync)
            self.metrics.update(loss, None if result is None else result.similarity,
                                {} if result is None else result.terms)
        return loss

    # --- the optimizer step ---------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Check the projector got gradients; while the loss is off, drop its (zero) gradients so that
        momentum and weight decay (AdamW) skip it, as they skip any parameter without a gradient."""
        params = list(getattr(pl_module, self.projector_attr).parameters())
        if self.metrics.aligned and not self._checked_gradients:
            self._checked_gradients = True
            local = [p for p in params if p.numel()]  # under FSDP a rank may hold none of the projector
            if local and all(p.grad is None for p in local):
                raise RuntimeError(frozen_message(self.projector_attr, "received no gradient in the first aligned step"))
        if not self.metrics.aligned:
            for p in params:
                p.grad = None

    # --- after the optimizer step: EMA, cutoff, logs --------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Once per optimizer step: fold the similarity into the EMA and the cutoff, and log `repa/*`."""
        if self._plan is None or trainer.global_step == self._plan.step:
            return  # still accumulating gradients
        step = self._plan.step
        similarity, means = self.metrics.close(step)  # same on every rank: the plan and the skip decision are
        logs = {"weight": self._plan.weight, "cutoff": float(not self.cutoff.is_active(step)), **means}
        if similarity is not None:
            if math.isfinite(similarity):
                self.cutoff.update(similarity, step)
            logs["similarity"] = similarity
        if self.cutoff.ema is not None:
            logs["similarity_ema"] = self.cutoff.ema
        self._logged = {f"{self.log_prefix}/{name}": value for name, value in logs.items()}
        if _writes_logs(trainer):  # each `log` call costs about 0.1-0.3 ms: only when Lightning writes them
            for name, value in self._logged.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name.endswith("/similarity"),
                              batch_size=1)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run shorter than `log_every_n_steps` (or ending between two logging steps) still hands the
        loggers the final `repa/*` values."""
        if self._logged and trainer.global_step % trainer.log_every_n_steps:
            for logger in trainer.loggers:
                logger.log_metrics(self._logged, step=trainer.global_step - 1)

    # --- diagnostics: CKNNA on a held-out batch -----------------------------------------
    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Arm the capture (without gradients) on the first validation batch when `repa/cknna` is due."""
        every = self.config.cknna_every_n_steps
        if not every or batch_idx or dataloader_idx or trainer.sanity_checking or self._capture is None:
            return
        if self._last_cknna is not None and trainer.global_step - self._last_cknna < every:
            return
        self._cknna_grid = self.family.grid(batch_latents(batch, self.config).shape, self._denoiser)
        self._capture.arm(math.prod(self._cknna_grid), with_grad=False)

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Log `repa/cknna`: projected student vs teacher tokens, pooled per sample, on the armed batch."""
        if self._cknna_grid is None:
            return
        grid, self._cknna_grid = self._cknna_grid, None
        latents = batch_latents(batch, self.config)
        if self._capture.grad_calls == 0 or latents.shape[0] < 4:
            self._capture.clear()
            if "cknna" not in self._warned:
                self._warned.add("cknna")
                rank_zero_warn("REPA: `cknna_every_n_steps` needs a validation_step that calls the denoiser on "
                               "batches of at least 4 samples; no `repa/cknna` is logged")
            return
        with torch.no_grad():
            captured = self._capture.take_all(grid)
            student, grid_s = per_frame(captured[self.block_index], grid)
            teacher, grid_t = per_frame(*self.teacher(batch, latents, captured))
            p, f = self.objective.align(student, grid_s, teacher, grid_t, getattr(pl_module, self.projector_attr))
        b = p.shape[0]
        pooled = [F.normalize(x.reshape(b, -1, x.shape[-1]).mean(1), dim=-1) for x in (p, f)]  # (B, D), as REPA
        value = cknna(*pooled, k=min(10, b - 1))
        self._last_cknna = trainer.global_step
        pl_module.log(f"{self.log_prefix}/cknna", value, on_step=False, on_epoch=True, batch_size=1)

    # --- teardown ----------------------------------------------------------------
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
        if self._capture is not None:
            self._capture.detach()
        if self._wrappers is not None:
            self._wrappers.remove()
        self._plan = self._record = None
        self._attached = self._created_projector = False

    # --- checkpoint ----------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """The cutoff's EMA, latch and settings."""
        return {"cutoff": self.cutoff.state_dict(), "metrics": self.metrics.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the cutoff; warn when its settings differ from the checkpoint's."""
        changed = self.cutoff.load_state_dict(state_dict["cutoff"])
        self.metrics.load_state_dict(state_dict.get("metrics", {}))
        if changed:
            rank_zero_warn(
                f"REPA ({self.state_key}): resuming with cutoff settings that differ from the checkpoint's "
                f"({'; '.join(changed)}); the saved EMA and latch are kept and the new settings apply from now on"
            )


def _writes_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning hands its loggers this optimizer step's values (every `log_every_n_steps`
    steps, as its logger connector decides right after `on_train_batch_end`), or the step is the
    run's last one, so that `trainer.callback_metrics` ends with the final values."""
    if trainer.fast_dev_run or trainer.should_stop:
        return True
    if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
        return True
    if trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs - 1 and trainer.is_last_batch:
        return True
    every = trainer.log_every_n_steps
    return bool(every) and trainer.global_step % every == 0
