"""lightning_repa: representation alignment (REPA and relatives) as a Lightning callback.

Layers, each a subpackage that imports only the ones before it (the README's "Layout" has the map):
`choices` (option enums and ranges, a leaf) -> `maths` (losses, grids, kernel alignment, schedule)
-> `objectives` (one per method, and the projectors) and `models` (diffusers families, capture
hooks) -> `config` (`RepaConfig`, `resolve`) -> `teachers` (encoders, decoders, the feature cache)
-> `alignment` (one micro-batch, no Lightning) -> `callbacks` (`RepaCallback`: the Lightning
glue) and `diagnostics` (the probe) -> `apps` (the command-line tools). `testing` (tiny models)
and `demo` stand beside them; nothing in the core imports them.

The public names below load on first use, so that the pure layers can be imported without
Lightning (`lightning_repa.losses`, `align`, `schedule` and `encoders` are the public paths of
SPEC section 2).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "RepaCallback": "lightning_repa.callbacks.repa",
    "RepaConfig": "lightning_repa.config",
    "Resolved": "lightning_repa.config",
    "resolve": "lightning_repa.config",
    "FAMILIES": "lightning_repa.models.families",
    "Family": "lightning_repa.models.families",
    "BlockList": "lightning_repa.models.families",
    "family_from_dict": "lightning_repa.models.families",
    "AlignmentStep": "lightning_repa.alignment.step",
    "StepInputs": "lightning_repa.alignment.step",
    "StepResult": "lightning_repa.alignment.step",
    "TeacherTokens": "lightning_repa.maths.align",
    "StaleCacheError": "lightning_repa.teachers.cache.stores",
    "LinearProjector": "lightning_repa.objectives.projectors",
    "MLPProjector": "lightning_repa.objectives.projectors",
    "ConvProjector": "lightning_repa.objectives.projectors",
    "IdentityProjector": "lightning_repa.objectives.projectors",
    "probe": "lightning_repa.diagnostics.probe",
    "from_simpletuner": "lightning_repa.simpletuner",
    "strip_projectors": "lightning_repa.callbacks.checkpoint",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_repa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
