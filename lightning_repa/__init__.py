"""lightning_repa: representation alignment (REPA and relatives) as a Lightning callback.

The public names load on first use, so that the pure modules (`lightning_repa.losses`, `align`,
`schedule`, `objectives`, ...) can be imported without Lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FAMILIES", "RepaCallback", "RepaConfig"]
__version__ = "0.1.0"

_LAZY = {"RepaCallback": "lightning_repa.callback", "RepaConfig": "lightning_repa.config",
         "FAMILIES": "lightning_repa.families"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_repa' has no attribute {name!r}")
