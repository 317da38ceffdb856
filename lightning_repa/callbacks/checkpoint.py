"""The callback's identity in checkpoints: its teacher's name and the state keys earlier versions
wrote, so that their checkpoints still restore the cutoff and the skip count. No Lightning import."""

from __future__ import annotations

from typing import Any

from lightning_repa.choices import Teacher
from lightning_repa.config import RepaConfig


def teacher_name(cfg: RepaConfig) -> str:
    """The teacher's one name, in the logs and in the state key: the encoder, or `backbone<block>`."""
    return cfg.encoder if cfg.teacher is Teacher.encoder else f"backbone{cfg.teacher_block_index}"


def legacy_state_keys(callback: Any) -> list[str]:
    """State keys this callback had in earlier versions: 0.1.0 named a backbone teacher `block <i>`
    and left `name` out of the key."""
    cfg = callback.config
    old_teacher = cfg.encoder if cfg.teacher is Teacher.encoder else f"block {cfg.teacher_block_index}"
    return [callback._generate_state_key(family=callback.family.name, block_index=callback.block_index,
                                         teacher=old_teacher)]
