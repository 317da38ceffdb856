"""The backbone teacher (SPEC section 4): a deeper block of the same forward, detached; no VAE, no
encoder (LayerSync with the identity projector). No Lightning."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from lightning_repa.maths.align import TeacherTokens, per_frame
from lightning_repa.models.capture import Captured


class BackboneTeacher:
    """The tokens of a deeper block (`block_index`) of the same forward, detached, on the student grid
    (per frame for video)."""

    embed_dim = None  # the student's own width

    def __init__(self, block_index: int) -> None:
        self.block_index = block_index

    def __call__(self, batch: Mapping[str, Any], latents: Tensor, captured: Optional[Captured]) -> TeacherTokens:
        if captured is None:
            raise ValueError("the backbone teacher reads a deeper block of the same forward: it needs the captured blocks")
        tokens, grid = per_frame(captured[self.block_index].detach(), captured.grid)  # (B, N, h) or (B, T', N, h)
        return TeacherTokens(tokens, grid)

    def to(self, *args: Any, **kwargs: Any) -> "BackboneTeacher":
        return self

    def set_autocast(self, dtype: Optional[torch.dtype]) -> None:
        """Nothing to do: its tokens come from the student's own forward, under the trainer's precision."""
