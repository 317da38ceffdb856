"""lightning_repa: representation alignment (REPA and relatives) as a Lightning callback."""

from lightning_repa.callback import RepaCallback
from lightning_repa.config import RepaConfig
from lightning_repa.families import FAMILIES

__all__ = ["FAMILIES", "RepaCallback", "RepaConfig"]
__version__ = "0.1.0"
