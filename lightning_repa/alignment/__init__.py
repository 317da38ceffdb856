"""One micro-batch of alignment without Lightning (`step`): captured tokens, the teacher, the
per-frame layout, the shape check and the objective, to the finiteness decision and a
`StepResult`. May import: choices, config, maths, models, objectives, teachers."""

from lightning_repa.alignment.step import AlignmentStep, StepInputs, StepResult

__all__ = ["AlignmentStep", "StepInputs", "StepResult"]
