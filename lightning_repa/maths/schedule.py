"""Weight schedule and cutoff of the alignment loss (SPEC section 7): pure, no Lightning.

`step` is always the optimizer step, i.e. `trainer.global_step`: the number of optimizer
steps taken so far (it does not count micro-batches of gradient accumulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from lightning_repa.choices import ScheduleKind, ThresholdMode, check_option


class WeightSchedule:
    """The scheduled weight `w(step)` of the alignment loss.

    Warm-up: for s < W, `w = lam * s / W`. After warm-up, with D = `decay_steps` (0: until
    `max_steps`) and `p = min((s - W) / max(D, 1), 1)`:

    - constant:   `w = lam`
    - linear:     `w = lam + (end - lam) * p`
    - cosine:     `w = end + (lam - end) * (1 + cos(pi p)) / 2`
    - polynomial: `w = end + (lam - end) * (1 - p) ** power`

    The decay ends at step W + D (warm-up 100, decay 5000: `end` from step 5100 on).

    Example::

        >>> w = WeightSchedule("cosine", lam=0.5, warmup_steps=100, decay_steps=5000)
        >>> w(0), w(50), w(100), w(5100)
        (0.0, 0.25, 0.5, 0.0)
    """

    def __init__(
        self,
        kind: str = "constant",
        lam: float = 0.5,
        warmup_steps: int = 0,
        decay_steps: int = 0,
        lambda_end: float = 0.0,
        power: float = 1.0,
        max_steps: Optional[int] = None,
    ) -> None:
        self.kind = ScheduleKind.parse(kind, "schedule")
        for name, value in (("lam", lam), ("lambda_end", lambda_end), ("warmup_steps", warmup_steps),
                            ("decay_steps", decay_steps), ("power", power)):
            check_option(name, value)
        self.lam, self.lambda_end, self.power = float(lam), float(lambda_end), float(power)
        self.warmup_steps, self.decay_steps = int(warmup_steps), int(decay_steps)
        self.max_steps = max_steps
        self._decay_length()  # fail now, not at the first decayed step

    def _decay_length(self) -> int:
        if self.decay_steps > 0 or self.kind is ScheduleKind.constant:
            return self.decay_steps
        if self.max_steps is None or self.max_steps < 0:
            raise ValueError(
                f"schedule={self.kind.value!r} with decay_steps=0 decays until max_steps, but max_steps is not set: "
                "set `decay_steps` or give the Trainer a `max_steps`"
            )
        if self.max_steps <= self.warmup_steps:
            raise ValueError(
                f"max_steps ({self.max_steps}) must exceed warmup_steps ({self.warmup_steps}) for the decay to happen"
            )
        return self.max_steps - self.warmup_steps

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        lam, end, warm = self.lam, self.lambda_end, self.warmup_steps
        if step < warm:
            return lam * step / warm
        if self.kind is ScheduleKind.constant:
            return lam
        p = min((step - warm) / max(self._decay_length(), 1), 1.0)
        if self.kind is ScheduleKind.linear:
            return lam + (end - lam) * p
        if self.kind is ScheduleKind.cosine:
            return end + (lam - end) * (1 + math.cos(math.pi * p)) / 2
        return end + (lam - end) * (1 - p) ** self.power

    def __repr__(self) -> str:
        return (
            f"WeightSchedule(kind={self.kind.value!r}, lam={self.lam}, warmup_steps={self.warmup_steps}, "
            f"decay_steps={self.decay_steps}, lambda_end={self.lambda_end}, power={self.power}, max_steps={self.max_steps})"
        )


class Cutoff:
    """Switches the alignment loss off: at a step, or when the similarity EMA is high enough.

    - Step cutoff: off for `step >= cutoff_step` when `cutoff_step > 0`.
    - Similarity cutoff: `update(similarity, step)` is called once per optimizer step with the
      similarity averaged over that step's micro-batches and over all ranks; the first value
      initialises the EMA. `permanent`: once EMA >= threshold, off for good. `recoverable`:
      off while EMA >= threshold, on again below it.

    Example::

        >>> c = Cutoff(threshold=0.9, ema_decay=0.5)
        >>> c.update(0.8, step=0); c.is_active(1)
        True
        >>> c.update(1.0, step=1); c.ema, c.is_active(2)
        (0.9, False)
    """

    def __init__(
        self,
        cutoff_step: int = 0,
        threshold: Optional[float] = None,
        ema_decay: float = 0.99,
        mode: str = "permanent",
    ) -> None:
        for name, value in (("cutoff_step", cutoff_step), ("similarity_threshold", threshold),
                            ("similarity_ema_decay", ema_decay)):
            check_option(name, value)
        self.cutoff_step = int(cutoff_step)
        self.threshold = threshold
        self.ema_decay = float(ema_decay)
        self.mode = ThresholdMode.parse(mode, "threshold_mode")
        self.ema: Optional[float] = None
        self.tripped_at: Optional[int] = None  # step of the update that switched it off (latched)
        self.below = True  # recoverable: the EMA is below the threshold
        self.reset()

    def reset(self) -> None:
        """Forget the EMA and the latch (a new fit that does not resume from a checkpoint)."""
        self.ema, self.tripped_at, self.below = None, None, True

    def update(self, similarity: float, step: int) -> None:
        """Fold one optimizer step's similarity (in [-1, 1]) into the EMA and the decision."""
        similarity = float(similarity)
        if math.isnan(similarity) or not -1.0 - 1e-4 <= similarity <= 1.0 + 1e-4:
            raise ValueError(f"similarity must be a cosine similarity in [-1, 1], got {similarity}")
        similarity = min(max(similarity, -1.0), 1.0)
        d = self.ema_decay
        self.ema = similarity if self.ema is None else d * self.ema + (1 - d) * similarity
        if self.threshold is None:
            return
        reached = self.ema >= self.threshold
        self.below = not reached
        if reached and self.mode is ThresholdMode.permanent and self.tripped_at is None:
            self.tripped_at = int(step)

    @property
    def needs_similarity(self) -> bool:
        """True when a similarity must still be measured while the loss is off (recoverable)."""
        return self.threshold is not None and self.mode is ThresholdMode.recoverable

    def past_step(self, step: int) -> bool:
        """True from `cutoff_step` on (the step cutoff; never when `cutoff_step` is 0)."""
        return self.cutoff_step > 0 and step >= self.cutoff_step

    def is_active(self, step: int) -> bool:
        """True while the loss is on at `step`."""
        return not self.past_step(step) and self.tripped_at is None and self.below

    @property
    def settings(self) -> dict[str, Any]:
        """The options that shape the decisions, saved beside the state."""
        return {"cutoff_step": self.cutoff_step, "threshold": self.threshold, "ema_decay": self.ema_decay,
                "mode": self.mode.value}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "tripped_at": self.tripped_at, "below": self.below, "settings": self.settings}

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore the EMA and the latch; return the settings that differ from the saved ones, as
        ``"name: saved -> now"`` (empty for checkpoints written before settings were saved)."""
        missing = {"ema", "tripped_at", "below"} - set(state)
        if missing:
            raise KeyError(f"Cutoff state is missing {sorted(missing)}")
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.tripped_at = None if state["tripped_at"] is None else int(state["tripped_at"])
        self.below = bool(state["below"])
        saved = state.get("settings", {})
        return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in self.settings.items() if k in saved and saved[k] != v]

    def __repr__(self) -> str:
        return (
            f"Cutoff(cutoff_step={self.cutoff_step}, threshold={self.threshold}, ema_decay={self.ema_decay}, "
            f"mode={self.mode.value!r}, ema={self.ema}, tripped_at={self.tripped_at})"
        )


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step does: its weight, and whether it measures the similarity at all."""

    step: int
    weight: float  # schedule x cutoff; 0 adds no loss
    measure: bool  # compute student and teacher tokens (True whenever weight > 0)


class Gate:
    """The one place that decides, per optimizer step, the weight and whether to measure.

    `weight = schedule(step)` while the cutoff is active, else 0. A step measures when its weight
    is positive, or, with a recoverable similarity cutoff that is off, when the schedule and the
    step cutoff would still give it a weight: the similarity must keep being measured (without
    gradients) for the loss to come back on. A permanent or step cutoff does no work at all.

    Example::

        >>> gate = Gate(WeightSchedule("constant", lam=0.5, warmup_steps=2), Cutoff(cutoff_step=3))
        >>> [(p.weight, p.measure) for p in map(gate.plan, range(4))]
        [(0.0, False), (0.25, True), (0.5, True), (0.0, False)]
    """

    def __init__(self, schedule: WeightSchedule, cutoff: Cutoff) -> None:
        self.schedule, self.cutoff = schedule, cutoff

    def plan(self, step: int) -> StepPlan:
        scheduled = self.schedule(step)
        weight = scheduled if self.cutoff.is_active(step) else 0.0
        keep_measuring = scheduled > 0 and not self.cutoff.past_step(step) and self.cutoff.needs_similarity
        return StepPlan(int(step), weight, weight > 0 or keep_measuring)
