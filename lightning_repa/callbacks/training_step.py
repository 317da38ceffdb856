"""The user's `training_step`, wrapped: the capture is armed before it runs and the weighted
alignment loss of the micro-batch is added to what it returns, so the loss reaches backward
(inside DDP's forward). No Lightning import: the trainer and the module are only read."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_repa.alignment import StepResult
from lightning_repa.callbacks.attach import batch_latents, check_pixels, has_validation
from lightning_repa.callbacks.metrics import StepRecord
from lightning_repa.maths.schedule import Gate, StepPlan, WeightSchedule
from lightning_repa.models.capture import BlockCapture


class AlignedTrainingStep:
    """One fit's alignment inside `training_step`, for the callback `repa` (a `RepaCallback`: its
    config, family, resolved blocks, alignment step, metrics, cutoff, projector attribute and log
    prefix are read here).

    `wrap(training_step)` returns the wrapper the callback installs on the module; `start(denoiser)`
    hooks the blocks and builds the gate at fit start; `close_step()` ends an optimizer step; `plan`
    is the optimizer step in flight and `last_result` the last micro-batch's
    :class:`~lightning_repa.alignment.StepResult`.
    """

    def __init__(self, repa: Any, trainer: Any, module: Any, warn: Callable[[str, bool, str], None]) -> None:
        self.repa, self.trainer, self.module, self.warn = repa, trainer, module, warn
        self.capture: Optional[BlockCapture] = None
        self.gate: Optional[Gate] = None
        self.plan: Optional[StepPlan] = None  # the optimizer step in flight
        self.last_result: Optional[StepResult] = None
        self._record: Optional[StepRecord] = None  # the micro-batch in flight
        self._manual_called = False
        self._checked_input = False  # the fit's first batch is looked at once (one host sync)

    def start(self, denoiser: nn.Module) -> WeightSchedule:
        """At fit start: hook the blocks of `denoiser` and build the gate; returns the schedule."""
        cfg, repa = self.repa.config, self.repa
        self.capture = BlockCapture(denoiser, repa.family, list(repa.resolved.hooked_blocks), cfg.align_call)
        schedule = WeightSchedule(cfg.schedule, cfg.lam, cfg.warmup_steps, cfg.decay_steps, cfg.lambda_end, cfg.power,
                                  self.trainer.max_steps)
        self.gate, self.plan, self._record = Gate(schedule, repa.cutoff), None, None
        self.capture.attach()
        self._checked_input = False
        steps = self.trainer.max_steps
        self.warn("warmup", 0 < steps <= cfg.warmup_steps and cfg.lam > 0,
                  f"warmup_steps={cfg.warmup_steps} is not shorter than the run (max_steps={steps}): the weight never "
                  f"reaches lam={cfg.lam} (it ends at {schedule(steps - 1):.3g})")
        self.warn("cknna-loop", cfg.cknna_every_n_steps > 0 and not has_validation(self.module, self.trainer),
                  f"cknna_every_n_steps={cfg.cknna_every_n_steps} measures the first validation batch, but there is no "
                  "validation loop (no validation_step, or limit_val_batches=0): no repa/cknna is logged")
        return schedule

    def close_step(self) -> Optional[dict[str, float]]:
        """After the optimizer stepped: the step's similarity folded into the EMA and the cutoff, and the
        values to log by name; None while gradients accumulate (the same on every rank)."""
        plan, metrics, cutoff = self.plan, self.repa.metrics, self.repa.cutoff
        if plan is None or self.trainer.global_step == plan.step:
            return None
        similarity, means = metrics.close(plan.step)  # means over micro-batches and ranks
        logs = {"weight": plan.weight, "cutoff": float(not cutoff.is_active(plan.step)), **means}
        if similarity is not None:
            if math.isfinite(similarity):
                cutoff.update(similarity, plan.step)
            logs["similarity"] = similarity
        if cutoff.ema is not None:
            logs["similarity_ema"] = cutoff.ema
        return logs

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)  # Lightning reads the signature for `batch_idx` / `dataloader_idx`
        def training_step(*args: Any, **kwargs: Any) -> Any:
            if not self.trainer.training:  # e.g. a validation_step that reuses training_step
                return original(*args, **kwargs)
            batch = args[0] if args else kwargs["batch"]
            self._begin(batch)
            try:
                output = original(*args, **kwargs)
            except BaseException:
                self.capture.clear()
                raise
            return self._end(batch, output)

        return training_step

    def _begin(self, batch: Any) -> None:
        latents = batch_latents(batch, self.repa.config)
        self.repa.step.objective.check_batch(latents.shape[0])
        if not self._checked_input:
            check_pixels(batch, self.repa.config)
            self._checked_input = True
        step = self.trainer.global_step
        if self.plan is None or self.plan.step != step:  # first micro-batch of this optimizer step
            self.plan = self.gate.plan(step)
            self.repa.metrics.reset()
        grid = self.repa.family.grid(latents.shape, self.capture.denoiser) if self.plan.measure else None
        self._record = StepRecord(self.plan, latents, grid)
        self._manual_called = False
        if grid is not None:
            self.capture.arm(math.prod(grid))
        else:
            self.capture.clear()

    def _end(self, batch: Any, output: Any) -> Any:
        if not self.module.automatic_optimization:
            if self._record.plan.measure and not self._manual_called:
                raise RuntimeError("with manual optimization, call `loss = loss + repa.compute_loss(batch)` in "
                                   "training_step before manual_backward (repa: the RepaCallback instance)")
            return output
        if output is None:  # the user skipped the step
            self.capture.clear()
            return None
        aux = self.compute_loss(batch)
        if isinstance(output, Tensor):
            return output + aux.to(output.dtype)
        if isinstance(output, Mapping) and "loss" in output:
            return {**output, "loss": output["loss"] + aux.to(output["loss"].dtype)}
        raise TypeError(f"training_step must return a loss tensor or a dict with 'loss' for REPA, got {type(output).__name__}")

    def compute_loss(self, batch: Mapping[str, Any]) -> Tensor:
        """The weighted alignment loss of this micro-batch (a scalar, 0 when it does not align)."""
        if self._manual_called:
            raise RuntimeError("compute_loss was called twice in one training_step: call it once per training_step "
                               "(the micro-batch's aligned denoiser call is scored once)")
        self._manual_called = True
        repa, plan = self.repa, self._record.plan
        projector, metrics = getattr(self.module, repa.projector_attr), repa.metrics
        zero = torch.zeros((), device=self.module.device)
        if self.trainer.world_size > 1:  # every projector parameter in the graph, so that
            # DDP(find_unused_parameters=False) also works on steps without alignment (weight 0, cutoff, skipped)
            zero = sum((p.sum() for p in projector.parameters()), zero) * 0.0
        if not plan.measure:
            self.capture.clear()
            self.last_result = StepResult(plan.step, plan.weight, False, zero.detach())
            return zero
        captured = self.capture.take_all(self._record.grid)
        calls = self.capture.grad_calls
        self.warn("calls", calls > 1 and repa.config.align_call == "first",
                  f"the denoiser ran {calls} times with gradients in one training step; the first call is aligned "
                  "(align_call='first'). Set align_call='last', or a predicate on the call's arguments, to choose another")
        any_rank = functools.partial(self.trainer.strategy.reduce_boolean_decision, all=False)
        aux, result = repa.step(captured, batch, self._record.latents, projector, plan, any_rank)
        loss = zero if aux is None else zero + aux
        result.loss, self.last_result = loss.detach(), result
        if result.skipped:
            metrics.skipped = result.nonfinite
            self.warn("skip", True, f"{result.nonfinite} of optimizer step {plan.step} are not finite; that step adds no "
                      "alignment loss (the rest of the loss and its gradients are untouched). Such steps are counted in "
                      f"`{repa.log_prefix}/skipped`; {repa.config.max_nonfinite_steps} in a row stop the run "
                      "(`max_nonfinite_steps`)")
        metrics.aligned |= aux is not None
        metrics.update(loss, result.similarity, result.terms)
        return loss

    def clear(self) -> None:
        """Take the hooks off and forget the step in flight (the fit ended or failed)."""
        if self.capture is not None:
            self.capture.detach()
        self.plan = self._record = None
