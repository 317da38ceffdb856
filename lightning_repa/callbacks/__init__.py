"""The Lightning glue: `RepaCallback` (Lightning's hooks only), attaching the projector to the
user's module (`attach`), the callback's identity in checkpoints (`checkpoint`) and what one
optimizer step reports (`metrics`). May import everything below it: choices, config, maths,
models, objectives, teachers, alignment."""

from lightning_repa.callbacks.repa import RepaCallback

__all__ = ["RepaCallback"]
