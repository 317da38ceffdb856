"""`RepaCallback`: the thin Lightning glue around capture, teacher, projector, loss and schedule."""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_repa.align import pool_tokens, resample_tokens
from lightning_repa.capture import BlockCapture
from lightning_repa.config import Cache, Decoder, Method, RepaConfig, Teacher
from lightning_repa.decoders import LatentDecoder, drop_vae_encoder, load_tiny_decoder
from lightning_repa.encoders import load_encoder, spatial_zscore
from lightning_repa.families import get_family
from lightning_repa.losses import token_cosine
from lightning_repa.projectors import build_projector
from lightning_repa.schedule import Cutoff, WeightSchedule
from lightning_repa.teacher import EncoderTeacher

DENOISER_ATTRS = ("denoiser", "transformer", "unet", "model")
PROJECTOR_ATTR = "repa_projector"
IMPLEMENTED_METHODS = (Method.repa,)
METHOD_OPTIONS = {  # options read by one method only
    Method.urepa: ("manifold_weight", "manifold_scope"),
    Method.crepa: ("distance", "tau", "cumulative_neighbours", "normalize_neighbours", "normalize_by_frames",
                   "distance_unit"),
}


def _get_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


class RepaCallback(Callback):
    r"""Adds REPA representation alignment to a LightningModule that trains a diffusers denoiser.

    In ``setup`` the trainable projector is attached to the module (as ``repa_projector``, so
    ``configure_optimizers`` over ``self.parameters()``, checkpoints and DDP see it) and the
    module's ``training_step`` is wrapped; in ``on_fit_start`` forward hooks are put on the
    chosen block. Each step the hook captures that block's image tokens, the clean latents of
    the batch are decoded and encoded by the frozen teacher, and
    ``-w * mean_b token_cosine(proj(h_b), f_b)`` is added to the loss the step returns, so it
    reaches backward (divided by ``accumulate_grad_batches`` like the rest of the loss). After
    each optimizer step the schedule, the similarity EMA and the cutoff advance and ``repa/*`` is
    logged through ``pl_module.log``.

    Args:
        config: a :class:`~lightning_repa.config.RepaConfig`; or give its fields as keyword
            arguments (``RepaCallback(family="flux", block_index=8, lam=0.5)``). Every option is
            documented once, in ``RepaConfig``.

    Raises:
        TypeError: unknown option (the closest valid name is suggested).
        ValueError: bad option values or combinations, at construction; unknown family,
            denoiser of the wrong class, method that does not fit the family, at construction or
            at fit start; block index out of range (``IndexError``) and a missing batch key
            (``KeyError``), before the first optimizer step.

    Batch: a mapping with the clean training-space latents under ``latents_key`` (B, C, h, w),
    and the clean images under ``pixels_key`` when ``decoder="pixels"``.

    Manual optimization: call ``loss = loss + repa.compute_loss(batch)`` in ``training_step``
    after the denoiser's forward and before ``manual_backward`` (``repa`` being this callback).

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
        if self.method is not self.family.method:
            raise ValueError(
                f"method={self.method.value!r} does not fit family={cfg.family!r}; use method={self.family.method.value!r}"
            )
        for method, names in METHOD_OPTIONS.items():
            ignored = cfg.non_default(names) if method is not self.method else []
            if ignored:
                raise ValueError(
                    f"`{ignored[0]}` is a {method.value} option; it has no effect with method={self.method.value!r}"
                )
        if self.method not in IMPLEMENTED_METHODS:
            raise NotImplementedError(f"method={self.method.value!r} is not available yet in this version")
        if cfg.cache is not Cache.none:
            raise NotImplementedError(
                f"cache={cfg.cache.value!r} is not available yet in this version: use cache=none (the teacher "
                "features are then computed every step)"
            )
        self.block_index = self.family.default_block_index if cfg.block_index is None else cfg.block_index
        if cfg.teacher is Teacher.backbone and cfg.teacher_block_index <= self.block_index:
            raise ValueError(
                f"`teacher_block_index` ({cfg.teacher_block_index}) must be greater than the student block "
                f"({self.block_index}, the family default when `block_index` is unset)"
            )
        self.cutoff = Cutoff(cfg.cutoff_step, cfg.similarity_threshold, cfg.similarity_ema_decay, cfg.threshold_mode)
        self.schedule: Optional[WeightSchedule] = None
        self.teacher: Optional[EncoderTeacher] = None
        self._encoder: Optional[nn.Module] = None
        self._denoiser: Optional[nn.Module] = None
        self._capture: Optional[BlockCapture] = None
        self._module: Optional[pl.LightningModule] = None
        self._trainer: Optional[pl.Trainer] = None
        self._metrics = {"loss": MeanMetric(), "similarity": MeanMetric()}
        self._step: Optional[int] = None  # optimizer step of the batch in flight
        self._weight = 0.0  # weight of that step
        self._manual_called = False
        self.projector_attr = PROJECTOR_ATTR
        self._wrappers: dict[str, Any] = {}  # our instance-level wrappers on the module, by name

    @classmethod
    def from_config(cls, cfg: Any) -> "RepaCallback":
        """From a RepaConfig, a dict or an OmegaConf node (the Hydra app's `repa` node)."""
        if isinstance(cfg, RepaConfig):
            return cls(cfg)
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
            pass
        options = {k: v for k, v in dict(cfg).items() if k != "_target_"}
        return cls(**options)

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

    # --- setup: projector and training_step wrapper ---------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer, self._module = trainer, pl_module
        self.projector_attr = self._projector_attr(trainer)
        if self.config.teacher is Teacher.encoder and self._encoder is None:
            self._encoder = self.build_encoder()
        if self._find_denoiser(pl_module) is not None:
            self._attach_projector(pl_module)
        else:  # built later, in LM.setup or configure_model
            original = pl_module.configure_model

            def configure_model() -> None:  # a plain closure: `is_overridden` must not unwrap it
                original()
                self._attach_projector(pl_module)

            pl_module.configure_model = self._wrappers["configure_model"] = configure_model
        self._wrap_training_step(pl_module)

    def _projector_attr(self, trainer: pl.Trainer) -> str:
        """`repa_projector`, or `repa_projector_<k>` for the k-th of several REPA callbacks."""
        mine = [cb for cb in trainer.callbacks if isinstance(cb, RepaCallback)]
        return PROJECTOR_ATTR if len(mine) == 1 else f"{PROJECTOR_ATTR}_{mine.index(self)}"

    def _find_denoiser(self, pl_module: pl.LightningModule) -> Optional[nn.Module]:
        paths = [self.config.denoiser] if self.config.denoiser else list(DENOISER_ATTRS)
        for path in paths:
            module = _get_path(pl_module, path)
            if isinstance(module, nn.Module):
                return module
        return None

    def _require_denoiser(self, pl_module: pl.LightningModule) -> nn.Module:
        module = self._find_denoiser(pl_module)
        if module is None:
            where = f"`{self.config.denoiser}`" if self.config.denoiser else ", ".join(f"`{a}`" for a in DENOISER_ATTRS)
            raise ValueError(
                f"RepaCallback found no denoiser on {type(pl_module).__name__} (looked at {where}); "
                "set `denoiser` to the dotted path of your transformer, e.g. denoiser='model.net'"
            )
        return module

    def _attach_projector(self, pl_module: pl.LightningModule) -> None:
        if self.config.drop_vae_encoder:  # before the optimizer and the checkpoint restore
            drop_vae_encoder(_get_path(pl_module, self.config.vae_attr), self.config.vae_attr)
        denoiser = self._require_denoiser(pl_module)
        self.family.check_class(denoiser)
        hidden = self.family.hidden_size(denoiser)
        out_dim = hidden if self._encoder is None else int(self._encoder.embed_dim)
        existing = getattr(pl_module, self.projector_attr, None)
        if existing is not None:  # a second fit on the same module keeps the trained projector
            dims = (getattr(existing, "in_dim", None), getattr(existing, "out_dim", None))
            if dims != (hidden, out_dim):
                raise ValueError(
                    f"`{self.projector_attr}` on the module maps {dims[0]} -> {dims[1]}, but the denoiser's blocks have "
                    f"width {hidden} and the teacher (`encoder`={self.config.encoder!r}) dimension {out_dim}; "
                    f"delete `{self.projector_attr}` to start a new projector, or use the encoder it was trained with"
                )
            return
        cfg = self.config
        projector = build_projector(cfg.projector, hidden, out_dim, cfg.projector_hidden, cfg.irepa_kernel_size)
        setattr(pl_module, self.projector_attr, projector.to(next(denoiser.parameters()).device))

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step

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

        pl_module.training_step = self._wrappers["training_step"] = training_step

    # --- fit start: hooks, teacher, schedule ------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cfg = self.config
        denoiser = self._denoiser = self._require_denoiser(pl_module)
        self._capture = BlockCapture(denoiser, self.family, self.student_indices)
        self._check_optimizer(trainer, pl_module)
        self.schedule = WeightSchedule(
            cfg.schedule, cfg.lam, cfg.warmup_steps, cfg.decay_steps, cfg.lambda_end, cfg.power, trainer.max_steps
        )
        if self._encoder is not None:
            self.teacher = EncoderTeacher(
                self._encoder, self._build_decoder(pl_module), cfg.pixels_key, cfg.pixels_range, cfg.encoder_batch_size
            ).to(pl_module.device)
        for metric in self._metrics.values():
            metric.to(pl_module.device).reset()
        self._capture.attach()
        rank_zero_info(
            f"REPA: family={cfg.family}, block {self.block_index} of {len(self._capture.blocks)}, "
            f"teacher={cfg.teacher.value}, projector={cfg.projector.value}, {self.schedule}"
        )

    def _check_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        projector = getattr(pl_module, self.projector_attr)
        optimised = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        if not all(id(p) in optimised for p in projector.parameters()):
            raise ValueError(
                f"the REPA projector (`{self.projector_attr}`) is not in any optimizer: build the optimizer from "
                "`self.parameters()` in configure_optimizers (the callback attaches it in setup, before)"
            )

    def _build_decoder(self, pl_module: pl.LightningModule) -> Optional[LatentDecoder]:
        cfg = self.config
        if cfg.decoder is Decoder.pixels:
            return None
        vae = _get_path(pl_module, cfg.vae_attr)
        if vae is None and (cfg.decoder is Decoder.vae or self.family.latent_format == "flux2"):
            raise ValueError(
                f"decoder={cfg.decoder.value} for family={cfg.family!r} needs the VAE at `vae_attr`={cfg.vae_attr!r} "
                f"on {type(pl_module).__name__}; attach it there, set `vae_attr`, or use decoder=pixels"
            )
        tae = load_tiny_decoder(cfg.tae_checkpoint, self.family.latent_format) if cfg.decoder is Decoder.tae else None
        return LatentDecoder(cfg.decoder, self.family.latent_format, vae=vae, tae=tae)

    # --- each step ---------------------------------------------------------------
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
        trainer = self._trainer
        latents = self._latents(batch)
        step = trainer.global_step
        if step != self._step:  # first micro-batch of this optimizer step
            self._step = step
            self._weight = self.schedule(step) if self.cutoff.is_active(step) else 0.0
        self._manual_called = False
        if self._measuring():
            grid = self.family.grid(latents.shape, self._denoiser)
            self._capture.arm(grid[0] * grid[1])
        else:
            self._capture.clear()

    def _measuring(self) -> bool:
        """Whether this step needs the student and teacher tokens at all."""
        if self._weight > 0:
            return True
        step = self._step
        scheduled = self.schedule(step) > 0 and not (self.config.cutoff_step and step >= self.config.cutoff_step)
        return scheduled and self.cutoff.needs_similarity  # recoverable: keep measuring while off

    def _end_step(self, batch: Any, output: Any) -> Any:
        module = self._module
        if not module.automatic_optimization:
            if self._measuring() and not self._manual_called:
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
        """The weighted alignment loss of this step (a scalar); call it after the denoiser's forward."""
        self._manual_called = True
        projector = getattr(self._module, self.projector_attr)
        # Keeps every projector parameter in the graph, so DDP(find_unused_parameters=False)
        # also works on steps without alignment (weight 0, after the cutoff).
        zero = sum(p.sum() for p in projector.parameters()) * 0.0
        if not self._measuring():
            self._capture.clear()
            self._metrics["loss"].update(0.0)
            return zero
        latents = self._latents(batch)
        grid_s = self.family.grid(latents.shape, self._denoiser)
        student = self._capture.take(self.block_index)  # (B, N, hidden)
        if self.teacher is None:  # backbone teacher: a deeper block of the same forward
            teacher, grid_t = self._capture.take(self.config.teacher_block_index).detach(), grid_s
        else:
            teacher, grid_t = self.teacher(batch, latents)  # (B, M, D)
        if self.config.irepa:
            teacher = spatial_zscore(teacher.float(), self.config.irepa_alpha)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._weight > 0):
            projected = projector(student, grid_s)  # (B, N, D)
            if self.config.spatial_align:
                projected = resample_tokens(projected, grid_s, grid_t)  # (B, M, D)
            else:
                projected, teacher = pool_tokens(projected), pool_tokens(teacher)
            if projected.shape[-1] != teacher.shape[-1]:
                raise ValueError(
                    f"projector output dim {projected.shape[-1]} != teacher dim {teacher.shape[-1]} (`encoder`)"
                )
            similarity = token_cosine(projected, teacher.to(projected.device)).mean()
            loss = zero - self._weight * similarity if self._weight > 0 else zero
        self._metrics["similarity"].update(similarity.detach())
        self._metrics["loss"].update(loss.detach())
        return loss

    # --- after the optimizer step: EMA, cutoff, logs --------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step is None or trainer.global_step == self._step:
            return  # still accumulating gradients
        step = self._step
        logs = {"repa/weight": self._weight, "repa/cutoff": float(not self.cutoff.is_active(step))}
        metrics = self._metrics
        if metrics["similarity"].update_count:  # same on every rank: the weight is
            similarity = float(metrics["similarity"].compute())  # mean over micro-batches and ranks
            if math.isfinite(similarity):
                self.cutoff.update(similarity, step)
            else:  # the same on every rank (reduced): skip it everywhere rather than stop training
                rank_zero_warn(f"REPA: non-finite similarity at step {step}; the similarity EMA skips it")
            logs["repa/similarity"] = similarity
        if metrics["loss"].update_count:
            logs["repa/loss"] = float(metrics["loss"].compute())
        if self.cutoff.ema is not None:
            logs["repa/similarity_ema"] = self.cutoff.ema
        for metric in metrics.values():
            metric.reset()
        for name, value in logs.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "repa/similarity", batch_size=1)

    # --- teardown ----------------------------------------------------------------
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._cleanup(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._cleanup(pl_module)

    def _cleanup(self, pl_module: pl.LightningModule) -> None:
        if self._capture is not None:
            self._capture.detach()
        for name, wrapper in self._wrappers.items():
            if pl_module.__dict__.get(name) is wrapper:
                del pl_module.__dict__[name]
        self._wrappers.clear()
        self._step = None

    # --- checkpoint ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cutoff.load_state_dict(state_dict["cutoff"])
