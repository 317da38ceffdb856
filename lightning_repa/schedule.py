"""The weight schedule and the cutoff at their public path (SPEC section 2); they live in
`lightning_repa.maths.schedule` with the rest of the pure tensor maths."""

from lightning_repa.maths.schedule import Cutoff, Gate, StepPlan, WeightSchedule

__all__ = ["Cutoff", "Gate", "StepPlan", "WeightSchedule"]
