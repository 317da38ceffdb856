"""`RepaCallback`: the thin Lightning glue around capture, teacher, projector, objective and gate."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_repa.align import Grid
from lightning_repa.capture import BlockCapture
from lightning_repa.config import Cache, Decoder, RepaConfig, Teacher
from lightning_repa.decoders import drop_vae_encoder
from lightning_repa.encoders import load_encoder
from lightning_repa.families import get_family
from lightning_repa.objectives import AlignResult, build_objective
from lightning_repa.projectors import build_projector
from lightning_repa.schedule import Cutoff, Gate, StepPlan, WeightSchedule
from lightning_repa.surgery import DENOISER_ATTRS, InstanceWrappers, find_denoiser, get_path, plain_tensor_init
from lightning_repa.teacher import TeacherProtocol, build_teacher

PROJECTOR_ATTR = "repa_projector"


@dataclass
class StepRecord:
    """One micro-batch, computed once in `training_step` and handed on: the optimizer step's plan
    (weight, measure), the clean latents and the student's token grid."""

    plan: StepPlan
    latents: Tensor  # (B, C, h, w) clean training latents
    grid: Optional[Grid]  # student token grid; None when this step does not measure


@dataclass
class StepResult:
    """The public outcome of the last micro-batch (`RepaCallback.last_result`): detached scalars."""

    step: int  # optimizer step (trainer.global_step)
    weight: float  # scheduled weight x cutoff
    measured: bool  # whether student and teacher tokens were computed
    loss: Tensor  # (), the weighted aux loss added to the step's loss (0 when not aligned)
    similarity: Optional[Tensor] = None  # (), mean cosine of matching tokens, when measured
    terms: dict[str, Tensor] = field(default_factory=dict)  # method terms, e.g. "manifold", "score"


class RepaCallback(Callback):
    r"""Adds representation alignment (REPA, U-REPA, iREPA) to a LightningModule that trains a diffusers denoiser.

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

    Observing a step: ``last_result`` (a :class:`StepResult`) holds the last micro-batch's weight,
    loss, similarity and method terms.

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
        if cfg.cache is not Cache.none:
            raise NotImplementedError(
                f"cache={cfg.cache.value!r} is not available yet in this version: use cache=none (the teacher "
                "features are then computed every step)"
            )
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
        self._metrics = {"loss": MeanMetric(), "similarity": MeanMetric()}
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
        return self._generate_state_key(family=cfg.family, block_index=self.block_index, teacher=teacher)

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
        self.projector_attr = self._projector_attr(trainer)
        self._wrappers = InstanceWrappers(pl_module)
        original = pl_module.configure_model

        def configure_model() -> None:  # a plain closure: `is_overridden` must not unwrap it
            original()
            self._attach(pl_module)

        # After LM.setup and the module's own configure_model, before the checkpoint restore,
        # configure_optimizers and DDP: the denoiser and the VAE exist, the optimizer does not yet.
        self._wrappers.install("configure_model", configure_model)
        self._wrappers.install("training_step", self._wrap_training_step(pl_module.training_step))

    def _projector_attr(self, trainer: pl.Trainer) -> str:
        """`repa_projector`, or `repa_projector_<k>` for the k-th of several REPA callbacks."""
        mine = [cb for cb in trainer.callbacks if isinstance(cb, RepaCallback)]
        return PROJECTOR_ATTR if len(mine) == 1 else f"{PROJECTOR_ATTR}_{mine.index(self)}"

    def _require_denoiser(self, pl_module: pl.LightningModule) -> nn.Module:
        denoiser, _ = find_denoiser(pl_module, self.config.denoiser)
        if denoiser is None:
            where = f"`{self.config.denoiser}`" if self.config.denoiser else ", ".join(f"`{a}`" for a in DENOISER_ATTRS)
            raise ValueError(
                f"RepaCallback found no denoiser on {type(pl_module).__name__} (looked at {where}); "
                "set `denoiser` to the dotted path of your transformer, e.g. denoiser='model.net'"
            )
        return denoiser

    def _attach(self, pl_module: pl.LightningModule) -> None:
        cfg = self.config
        if cfg.drop_vae_encoder:  # before the optimizer and the checkpoint restore
            drop_vae_encoder(get_path(pl_module, cfg.vae_attr), cfg.vae_attr)
        denoiser = self._require_denoiser(pl_module)
        self.family.check_class(denoiser)
        with plain_tensor_init():  # the encoder is built once; the decoder reads this module's VAE
            self.teacher = build_teacher(cfg, self.family, pl_module, self._encoder)
        hidden = self.family.hidden_size(denoiser)
        out_dim = self.teacher.embed_dim or hidden
        existing = getattr(pl_module, self.projector_attr, None)
        if existing is not None:  # a second fit on the same module keeps the trained projector
            dims = (getattr(existing, "in_dim", None), getattr(existing, "out_dim", None))
            if dims != (hidden, out_dim):
                raise ValueError(
                    f"`{self.projector_attr}` on the module maps {dims[0]} -> {dims[1]}, but the denoiser's blocks have "
                    f"width {hidden} and the teacher (`encoder`={cfg.encoder!r}) dimension {out_dim}; "
                    f"delete `{self.projector_attr}` to start a new projector, or use the encoder it was trained with"
                )
        else:
            projector = build_projector(cfg.projector, hidden, out_dim, cfg.projector_hidden, cfg.irepa_kernel_size)
            setattr(pl_module, self.projector_attr, projector.to(next(denoiser.parameters()).device))
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
        denoiser = self._denoiser = self._require_denoiser(pl_module)
        self._capture = BlockCapture(denoiser, self.family, self.student_indices)
        self._check_optimizer(trainer, pl_module)
        schedule = WeightSchedule(
            cfg.schedule, cfg.lam, cfg.warmup_steps, cfg.decay_steps, cfg.lambda_end, cfg.power, trainer.max_steps
        )
        self.gate = Gate(schedule, self.cutoff)
        if isinstance(self.teacher, nn.Module):
            self.teacher.to(pl_module.device)
        for metric in self._metrics.values():
            metric.to(pl_module.device).reset()
        self._capture.attach()
        rank_zero_info(
            f"REPA: family={cfg.family}, block {self.block_index} of {len(self._capture.blocks)}, "
            f"method={self.method.value}, teacher={cfg.teacher.value}, projector={cfg.projector.value}, {schedule}"
        )

    def _check_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        projector = getattr(pl_module, self.projector_attr)
        optimised = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        if not all(id(p) in optimised for p in projector.parameters()):
            raise ValueError(
                f"the REPA projector (`{self.projector_attr}`) is not in any optimizer: build the optimizer from "
                "`self.parameters()` in configure_optimizers (the callback attaches it in setup, before)"
            )

    # --- each micro-batch ---------------------------------------------------------
    def _latents(self, batch: Any) -> Tensor:
        key = self.config.latents_key
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"RepaCallback reads the clean latents from batch[{key!r}], but the batch is a {type(batch).__name__}; "
                "return a dict from your dataset/collate_fn"
            )
        if key not in batch:
            raise KeyError(
                f"batch has no {key!r} (keys: {sorted(batch)}); set `latents_key` to the key of the clean "
                "training-space latents"
            )
        if self.config.decoder is Decoder.pixels and self.config.pixels_key not in batch:
            raise KeyError(
                f"decoder=pixels reads batch[{self.config.pixels_key!r}], which is missing (keys: {sorted(batch)}); "
                "set `pixels_key` or use decoder=vae/tae"
            )
        return batch[key]

    def _begin_step(self, batch: Any) -> None:
        latents = self._latents(batch)
        step = self._trainer.global_step
        if self._plan is None or self._plan.step != step:  # first micro-batch of this optimizer step
            self._plan = self.gate.plan(step)
        grid = self.family.grid(latents.shape, self._denoiser) if self._plan.measure else None
        self._record = StepRecord(self._plan, latents, grid)
        self._manual_called = False
        if grid is not None:
            self._capture.arm(grid[0] * grid[1])
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
        # Keeps every projector parameter in the graph, so DDP(find_unused_parameters=False)
        # also works on steps without alignment (weight 0, after the cutoff).
        zero = sum(p.sum() for p in projector.parameters()) * 0.0
        weight = record.plan.weight
        if not record.plan.measure:
            self._capture.clear()
            return self._finish(record, zero, None)
        captured = self._capture.take_all(record.grid)
        teacher, grid_t = self.teacher(batch, record.latents, captured)  # (B, M, D)
        with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
            result = self.objective(captured[self.block_index], record.grid, teacher, grid_t, projector)
            loss = zero + weight * result.loss if weight > 0 else zero
        return self._finish(record, loss, result)

    def _finish(self, record: StepRecord, loss: Tensor, result: Optional[AlignResult]) -> Tensor:
        plan = record.plan
        self.last_result = StepResult(plan.step, plan.weight, plan.measure, loss.detach())
        self._metrics["loss"].update(loss.detach())
        if result is not None:
            self.last_result.similarity, self.last_result.terms = result.similarity, result.terms
            self._metrics["similarity"].update(result.similarity)
            for name, value in result.terms.items():
                self._term_metric(name).update(value)
        return loss

    def _term_metric(self, name: str) -> MeanMetric:
        if name not in self._metrics:
            self._metrics[name] = MeanMetric().to(self._module.device)
        return self._metrics[name]

    # --- the optimizer step ---------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """While the loss is off, the projector does not move: its (zero) gradients are dropped, so
        momentum and weight decay (AdamW) skip it, as they skip any parameter without a gradient."""
        if self._plan is not None and self._plan.weight == 0:
            for p in getattr(pl_module, self.projector_attr).parameters():
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
        logs = {"repa/weight": self._plan.weight, "repa/cutoff": float(not self.cutoff.is_active(step))}
        metrics = self._metrics
        if metrics["similarity"].update_count:  # same on every rank: the plan is
            similarity = float(metrics["similarity"].compute())  # mean over micro-batches and ranks
            if math.isfinite(similarity):
                self.cutoff.update(similarity, step)
            else:  # the same on every rank (reduced): skip it everywhere rather than stop training
                rank_zero_warn(f"REPA: non-finite similarity at step {step}; the similarity EMA skips it")
            logs["repa/similarity"] = similarity
        for name, metric in metrics.items():
            if name != "similarity" and metric.update_count:
                logs[f"repa/{name}"] = float(metric.compute())
        if self.cutoff.ema is not None:
            logs["repa/similarity_ema"] = self.cutoff.ema
        for metric in metrics.values():
            metric.reset()
        for name, value in logs.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "repa/similarity", batch_size=1)

    # --- teardown ----------------------------------------------------------------
    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the hooks and the wrappers."""
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
        self._attached = False

    # --- checkpoint ----------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """The cutoff's EMA, latch and settings."""
        return {"cutoff": self.cutoff.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the cutoff; warn when its settings differ from the checkpoint's."""
        changed = self.cutoff.load_state_dict(state_dict["cutoff"])
        if changed:
            rank_zero_warn(
                f"REPA ({self.state_key}): resuming with cutoff settings that differ from the checkpoint's "
                f"({'; '.join(changed)}); the saved EMA and latch are kept and the new settings apply from now on"
            )
