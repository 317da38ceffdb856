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
from typing_extensions import override

from lightning_repa.align import Grid, per_frame
from lightning_repa.capture import BlockCapture
from lightning_repa.config import Cache, Decoder, Method, RepaConfig, Teacher
from lightning_repa.decoders import drop_vae_encoder
from lightning_repa.encoders import load_encoder
from lightning_repa.families import get_family
from lightning_repa.objectives import AlignResult, build_objective
from lightning_repa.projectors import build_projector
from lightning_repa.schedule import Cutoff, Gate, StepPlan, WeightSchedule
from lightning_repa.step_metrics import StepMetrics
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
    skipped: bool = False  # measured, but something was not finite: no alignment loss was added


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
        self.metrics = StepMetrics(cfg.max_nonfinite_steps)
        self.log_prefix = "repa"  # `repa/<name>` when several REPA callbacks log
        self._created_projector = False  # this fit attached a new projector
        self._checked_gradients = False
        self._warned: set[str] = set()
        self._logged: dict[str, float] = {}  # the last step's logged values
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
        mine = [cb for cb in trainer.callbacks if isinstance(cb, RepaCallback)]
        self.projector_attr = PROJECTOR_ATTR if len(mine) == 1 else f"{PROJECTOR_ATTR}_{mine.index(self)}"
        self.log_prefix = _log_prefixes(mine)[mine.index(self)]
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

    def _require_denoiser(self, pl_module: pl.LightningModule) -> nn.Module:
        """The denoiser (unwrapped from torch.compile, PEFT, DDP/FSDP wrappers), of the family's class."""
        denoiser, path = find_denoiser(pl_module, self.config.denoiser)
        if denoiser is None:
            where = f"`{self.config.denoiser}`" if self.config.denoiser else ", ".join(f"`{a}`" for a in DENOISER_ATTRS)
            raise ValueError(
                f"RepaCallback found no denoiser on {type(pl_module).__name__} (looked at {where}); "
                "set `denoiser` to the dotted path of your transformer, e.g. denoiser='model.net'"
            )
        try:
            self.family.check_class(denoiser)
        except ValueError as error:
            how = "the `denoiser` option" if self.config.denoiser else (
                f"the default search ({', '.join(DENOISER_ATTRS)}, the first module found)")
            raise ValueError(
                f"{error}. The module was found at `{path}` by {how}; set `denoiser` to the dotted path of the "
                f"{'/'.join(self.family.classes)} inside your LightningModule (e.g. denoiser='model.transformer')"
            ) from None
        return denoiser

    def _attach(self, pl_module: pl.LightningModule) -> None:
        cfg = self.config
        if cfg.drop_vae_encoder:  # before the optimizer and the checkpoint restore
            drop_vae_encoder(get_path(pl_module, cfg.vae_attr), cfg.vae_attr)
        denoiser = self._require_denoiser(pl_module)
        with plain_tensor_init():  # the encoder is built once; the decoder reads this module's VAE
            self.teacher = build_teacher(cfg, self.family, pl_module, self._encoder)
        hidden = self.family.hidden_size(denoiser)
        out_dim = self.teacher.embed_dim or hidden
        existing = getattr(pl_module, self.projector_attr, None)
        if existing is not None:  # a second fit on the same module keeps the trained projector
            dims = (getattr(existing, "in_dim", None), getattr(existing, "out_dim", None))
            if dims != (hidden, out_dim):
                raise ValueError(
                    f"`{self.projector_attr}` on the module (kept from an earlier fit or a checkpoint) maps {dims[0]} -> "
                    f"{dims[1]}, but this fit needs {hidden} -> {out_dim} (the denoiser's width {hidden}, the teacher "
                    f"{self.teacher_name!r} dimension {out_dim}); delete `{self.projector_attr}` to start a new projector, or align "
                    "to the teacher it was trained with"
                )
            self._created_projector = False
        else:
            projector = build_projector(cfg.projector, hidden, out_dim, cfg.projector_hidden, cfg.irepa_kernel_size)
            setattr(pl_module, self.projector_attr, projector.to(next(denoiser.parameters()).device))
            self._created_projector = True
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
        self._capture = BlockCapture(denoiser, self.family, self.student_indices, cfg.align_call)
        self._check_trainable(pl_module)
        self._check_optimizer(trainer, pl_module)
        schedule = WeightSchedule(
            cfg.schedule, cfg.lam, cfg.warmup_steps, cfg.decay_steps, cfg.lambda_end, cfg.power, trainer.max_steps
        )
        self.gate = Gate(schedule, self.cutoff)
        if isinstance(self.teacher, nn.Module):
            self.teacher.to(pl_module.device)
        self.metrics.to(pl_module.device).reset()
        self._checked_gradients = False
        self._capture.attach()
        rank_zero_info(
            f"REPA: family={cfg.family}, block {self.block_index} of {len(self._capture.blocks)}, "
            f"method={self.method.value}, teacher={cfg.teacher.value}, projector={cfg.projector.value}, {schedule}"
        )

    def _frozen_message(self, what: str) -> str:
        attr = self.projector_attr
        return (
            f"the REPA projector (`{attr}`) {what}: it is frozen, so the alignment would pull the model towards a "
            f"fixed random projection. Something froze the whole module after the callback attached it (e.g. "
            f"`self.requires_grad_(False)` before adding LoRA adapters, or PEFT's get_peft_model on the module): "
            f"freeze only the denoiser (`self.transformer.requires_grad_(False)`), or call "
            f"`self.{attr}.requires_grad_(True)` after freezing, before the optimizer is built"
        )

    def _check_trainable(self, pl_module: pl.LightningModule) -> None:
        frozen = [n for n, p in getattr(pl_module, self.projector_attr).named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(self._frozen_message(f"has requires_grad=False ({', '.join(frozen)})"))

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
        # Keeps every projector parameter in the graph, so DDP(find_unused_parameters=False)
        # also works on steps without alignment (weight 0, after the cutoff, skipped).
        zero = sum(p.sum() for p in projector.parameters()) * 0.0
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
        bad = _nonfinite(("the teacher tokens", teacher), ("the student tokens", student))
        result = None
        if bad is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                result = self.objective(student, grid_s, teacher, grid_t, projector)
            bad = _nonfinite(("the alignment loss", result.loss))
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
        self.metrics.update(loss, None if result is None else result.similarity, {} if result is None else result.terms)
        return loss

    # --- the optimizer step ---------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Check the projector got gradients; while the loss is off, drop its (zero) gradients so that
        momentum and weight decay (AdamW) skip it, as they skip any parameter without a gradient."""
        params = list(getattr(pl_module, self.projector_attr).parameters())
        if self.metrics.aligned and not self._checked_gradients:
            self._checked_gradients = True
            if all(p.grad is None for p in params):
                raise RuntimeError(self._frozen_message("received no gradient in the first aligned step"))
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
        for name, value in self._logged.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name.endswith("/similarity"), batch_size=1)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run shorter than `log_every_n_steps` (or ending between two logging steps) still hands the
        loggers the final `repa/*` values."""
        if self._logged and trainer.global_step % trainer.log_every_n_steps:
            for logger in trainer.loggers:
                logger.log_metrics(self._logged, step=trainer.global_step - 1)

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


def _nonfinite(*named: tuple[str, Tensor]) -> Optional[str]:
    """The name of the first tensor with a NaN or an infinity, or None."""
    for name, x in named:
        if not bool(torch.isfinite(x).all()):
            return name
    return None


def _log_prefixes(callbacks: list[RepaCallback]) -> list[str]:
    """`repa` for a single unnamed callback; else `repa/<name>`, the name defaulting to the teacher,
    numbered where two are alike."""
    if len(callbacks) == 1 and callbacks[0].config.name is None:
        return ["repa"]
    names = [cb.config.name or cb.teacher_name for cb in callbacks]
    counts: dict[str, int] = {}
    prefixes = []
    for name in names:
        if names.count(name) > 1:
            counts[name] = counts.get(name, 0) + 1
            name = f"{name}_{counts[name] - 1}"
        prefixes.append(f"repa/{name}")
    return prefixes
