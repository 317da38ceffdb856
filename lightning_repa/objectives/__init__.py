"""Alignment objectives, one module per method (SPEC section 6), and the trainable projectors
(SPEC section 5); pure tensor maths, no Lightning. May import: choices, maths.

`OBJECTIVES` maps each `Method` to its objective class; adding a method is one module and one
entry here. Every objective has the same call::

    objective = build_objective(Method.repa, config)
    result = objective(student, grid_s, teacher_tokens, projector)   # AlignResult
    aux = weight * result.loss
"""

from __future__ import annotations

from typing import Any

from lightning_repa.choices import Method
from lightning_repa.objectives.base import AlignResult, Objective, spatial_zscore
from lightning_repa.objectives.crepa import CRepaObjective
from lightning_repa.objectives.projectors import (
    ConvProjector,
    IdentityProjector,
    LinearProjector,
    MLPProjector,
    build_projector,
)
from lightning_repa.objectives.repa import RepaObjective
from lightning_repa.objectives.urepa import URepaObjective

OBJECTIVES: dict[Method, type[Objective]] = {
    Method.repa: RepaObjective,
    Method.urepa: URepaObjective,
    Method.crepa: CRepaObjective,
}


def build_objective(method: Method, cfg: Any) -> Objective:
    """The objective of `method`, configured from a `RepaConfig`."""
    return OBJECTIVES[Method.parse(method, "method")].from_config(cfg)


__all__ = ["OBJECTIVES", "AlignResult", "CRepaObjective", "ConvProjector", "IdentityProjector", "LinearProjector",
           "MLPProjector", "Objective", "RepaObjective", "URepaObjective", "build_objective", "build_projector",
           "spatial_zscore"]
