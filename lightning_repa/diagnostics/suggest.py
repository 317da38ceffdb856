"""Which block the probe suggests aligning, from its per-block scores. Pure, no torch."""

from __future__ import annotations

import math
from typing import Optional, Sequence

__all__ = ["suggest_block", "suggestion_window"]


def suggestion_window(num_blocks: int, depth_fraction: float = 2 / 3) -> int:
    """How many of the first blocks the suggestion looks at: `ceil(depth_fraction * L)`, at least one."""
    if not 0.0 < depth_fraction <= 1.0:
        raise ValueError(f"`depth_fraction` must be in (0, 1], got {depth_fraction}")
    return max(1, math.ceil(depth_fraction * num_blocks - 1e-9))


def suggest_block(scores: Sequence[float], depth_fraction: float = 2 / 3) -> Optional[int]:
    """The block to align: the highest score (CKNNA averaged over noise levels) among the first
    `suggestion_window(L, depth_fraction)` of the L blocks; None when all of those are NaN.

    Why this rule: REPA (Yu et al. 2025, "Representation alignment for generation", section 4 and
    its block ablation) found that aligning an early-to-middle block helps most (block 8 of
    SiT-XL/2's 28) and that aligning later blocks helps less: the last blocks turn the
    representation into the prediction (velocity or noise) and are better left to the diffusion
    loss. The probe measures where teacher-like features already form without training; among the
    blocks REPA would consider, the one that agrees most with the teacher needs the least bending
    to align. It is a heuristic starting point: on a model whose early blocks are uniformly weak it
    still names one, and a fresh model's alignment says little (probe the model you will train,
    e.g. the pretrained base of a fine-tune).
    """
    window = suggestion_window(len(scores), depth_fraction)
    candidates = [(s, -i) for i, s in enumerate(scores[:window]) if s is not None and not math.isnan(s)]
    return -max(candidates)[1] if candidates else None
