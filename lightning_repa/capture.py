"""Forward hooks that capture the image tokens of chosen blocks (SPEC section 3). No Lightning.

The capture is armed for one training step and takes the *first* call of each hooked block
only: gradient-checkpointing recomputation, a second (CFG, EMA, validation) forward and
unarmed steps are ignored, and nothing is kept past `take`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_repa.families import Family, Grid, call_arguments


@dataclass
class Captured:
    """What one step captured: block index -> image tokens (B, N, D), on the student grid."""

    tokens: dict[int, Tensor]
    grid: Grid

    def __getitem__(self, index: int) -> Tensor:
        return self.tokens[index]


class BlockCapture:
    """Captures the image stream (B, N, D) of `indices` (0-based over all blocks in forward order).

    Example::

        cap = BlockCapture(transformer, FAMILIES["flux"], [8])
        cap.attach()
        cap.arm(num_image_tokens=1024)
        transformer(**inputs)
        tokens = cap.take(8)  # (B, 1024, hidden)
        cap.detach()
    """

    def __init__(self, denoiser: nn.Module, family: Family, indices: list[int]) -> None:
        family.check_class(denoiser)
        self.denoiser, self.family = denoiser, family
        self.blocks = family.block_modules(denoiser)
        for index in indices:
            if not 0 <= index < len(self.blocks):
                lists = ", ".join(f"{s.attr}: {len(s.modules(denoiser, family.name))}" for s in family.blocks)
                raise IndexError(
                    f"block index {index} is out of range for family={family.name!r}: "
                    f"{type(denoiser).__name__} has {len(self.blocks)} blocks ({lists}); use 0..{len(self.blocks) - 1}"
                )
        self.indices = sorted(set(indices))
        self._handles: list[RemovableHandle] = []
        self._armed = False
        self._num_tokens = 0
        self._call: Optional[dict[str, Any]] = None
        self._captured: dict[int, Tensor] = {}

    # --- lifecycle -----------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.denoiser.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for index in self.indices:
            spec, block = self.blocks[index]
            self._handles.append(block.register_forward_hook(self._make_hook(index), with_kwargs=False))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.disarm()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def arm(self, num_image_tokens: int) -> None:
        """Capture the next forward of the denoiser; `num_image_tokens` is N from the latent grid."""
        self._armed, self._num_tokens = True, int(num_image_tokens)
        self._call, self._captured = None, {}

    def disarm(self) -> None:
        self._armed, self._call = False, None

    def clear(self) -> None:
        self.disarm()
        self._captured = {}

    def take(self, index: int) -> Tensor:
        """The captured image tokens of block `index` (B, N, D); an error if it never ran."""
        if index not in self._captured:
            raise RuntimeError(
                f"block {index} (of {len(self.blocks)}) of family={self.family.name!r} did not run with gradients in "
                "this training step: call the denoiser "
                f"({type(self.denoiser).__name__}) inside training_step, through its forward"
            )
        return self._captured.pop(index)

    def take_all(self, grid: Grid) -> Captured:
        """Every captured block (each an error if it never ran), on the student `grid`; nothing is kept."""
        return Captured({index: self.take(index) for index in self.indices}, grid)

    # --- hooks ---------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # The first forward *with gradients*: a no-grad pass first (self-conditioning, a target)
        # would give tokens without a graph, and the denoiser no alignment gradient.
        if self._armed and self._call is None and torch.is_grad_enabled():
            self._call = call_arguments(module, args, kwargs)

    def _make_hook(self, index: int):
        spec = self.blocks[index][0]

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._armed or index in self._captured or self._call is None:
                return
            tokens = spec.select(spec.stream(output), self._num_tokens, self._call)  # (B, N, D)
            if tokens.shape[1] != self._num_tokens:
                raise RuntimeError(
                    f"family={self.family.name!r}, block {index}: expected {self._num_tokens} image tokens from the "
                    f"latent grid, the block's image stream has {tokens.shape[1]}; are the batch latents the ones "
                    "the denoiser was called with?"
                )
            self._captured[index] = tokens
            if len(self._captured) == len(self.indices):
                self.disarm()

        return hook
