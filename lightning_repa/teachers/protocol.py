"""The teacher protocol (SPEC section 4): `teacher(batch, latents, captured) -> TeacherTokens`.

Every teacher — the frozen encoder on the clean images (`EncoderTeacher`), a deeper block of the
same forward (`BackboneTeacher`), and the feature cache that wraps the first (`CachedTeacher`) —
has this call, and returns a value (tokens, their grid, and the temporal compression of video
frames) instead of setting attributes that a caller would have to read back. No Lightning.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

import torch
from torch import Tensor

from lightning_repa.maths.align import TeacherTokens
from lightning_repa.models.capture import Captured


class TeacherProtocol(Protocol):
    embed_dim: Optional[int]  # width of the teacher tokens; None: the student's own width

    def __call__(self, batch: Mapping[str, Any], latents: Tensor, captured: Optional[Captured]) -> TeacherTokens:
        """Teacher tokens (B, M, D), or (B, T', M, D) per latent frame, on their grid, without gradients."""
        ...

    def to(self, device: Any) -> Any:
        """Move whatever the teacher computes with to the training device."""
        ...

    def set_autocast(self, dtype: Optional[torch.dtype]) -> None:
        """Compute under autocast to `dtype` (the trainer's bf16), or None: as the caller's context has it."""
        ...
