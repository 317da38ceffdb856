"""Forward hooks that capture the image tokens of chosen blocks (SPEC section 3). No Lightning.

The capture is armed for one training step and takes the *first* call of each hooked block
only: gradient-checkpointing recomputation, a second (CFG, EMA, validation) forward and
unarmed steps are ignored, and nothing is kept past `take`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_repa.models.families import Family, Grid, call_arguments


@dataclass
class Captured:
    """What one step captured: block index -> image tokens (B, N, D), on the student grid."""

    tokens: dict[int, Tensor]
    grid: Grid

    def __getitem__(self, index: int) -> Tensor:
        return self.tokens[index]


CallRule = Union[str, Callable[[dict[str, Any]], bool]]


class BlockCapture:
    """Captures the image stream (B, N, D) of `indices` (0-based over all blocks in forward order).

    One denoiser call with gradients per armed step is aligned, chosen by `align_call`: "first"
    (the default), "last", or a predicate on the call's arguments by name (the first call it
    accepts). Calls without gradients (a self-conditioning or target pass) are never chosen.
    Under diffusers' gradient checkpointing the block's output is taken where it carries the
    graph: from the block itself (non-reentrant), or from the checkpoint function's result
    (reentrant, whose first forward runs without gradients).

    Example::

        cap = BlockCapture(transformer, FAMILIES["flux"], [8])
        cap.attach()
        cap.arm(num_image_tokens=1024)
        transformer(**inputs)
        tokens = cap.take(8)  # (B, 1024, hidden)
        cap.detach()
    """

    def __init__(self, denoiser: nn.Module, family: Family, indices: list[int], align_call: CallRule = "first") -> None:
        family.check_class(denoiser)
        self.denoiser, self.family, self.align_call = denoiser, family, align_call
        self.blocks = family.block_modules(denoiser)
        for index in indices:
            if not 0 <= index < len(self.blocks):
                lists = ", ".join(f"{s.attr}: {len(s.modules(denoiser, family.name))}" for s in family.blocks)
                raise IndexError(
                    f"block index {index} is out of range for family={family.name!r}: "
                    f"{type(denoiser).__name__} has {len(self.blocks)} blocks ({lists}); use 0..{len(self.blocks) - 1}"
                )
        self.indices = sorted(set(indices))
        self._index_of = {id(self.blocks[i][1]): i for i in self.indices}
        self._handles: list[RemovableHandle] = []
        self._checkpointing: dict[nn.Module, Callable] = {}  # module -> its own checkpoint function
        self._checkpoint_owners: list[nn.Module] = []
        self._armed = self._active = False
        self._num_tokens = 0
        self._call: Optional[dict[str, Any]] = None
        self._captured: dict[int, Tensor] = {}
        self._without_grad: set[int] = set()
        self._with_grad = True
        self.grad_calls = 0  # denoiser calls with gradients since `arm`
        self.calls_without_grad = 0  # denoiser calls without gradients since `arm` (never aligned)

    # --- lifecycle -----------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        self._checkpoint_owners = [m for m in self.denoiser.modules() if hasattr(m, "gradient_checkpointing")]
        self._handles.append(self.denoiser.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._handles.append(self.denoiser.register_forward_hook(self._on_return, always_call=True))
        for index in self.indices:
            block = self.blocks[index][1]
            self._handles.append(block.register_forward_hook(self._make_hook(index)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, original in self._checkpointing.items():
            if getattr(module.__dict__.get("_gradient_checkpointing_func"), "_repa_capture", None) is self:
                module._gradient_checkpointing_func = original
        self._checkpointing.clear()
        self.disarm()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def arm(self, num_image_tokens: int, with_grad: bool = True) -> None:
        """Capture the chosen denoiser call of this step; `num_image_tokens` is N from the latent grid.
        `with_grad=False` (diagnostics on a validation batch) also takes calls without gradients."""
        self._armed, self._active, self._num_tokens = True, False, int(num_image_tokens)
        self._with_grad = with_grad
        self._call, self._captured, self._without_grad, self.grad_calls = None, {}, set(), 0
        self.calls_without_grad = 0

    def disarm(self) -> None:
        self._armed, self._active, self._call = False, False, None

    def clear(self) -> None:
        self.disarm()
        self._captured = {}

    def take(self, index: int) -> Tensor:
        """The captured image tokens of block `index` (B, N, D); an error if it never ran."""
        if index not in self._captured:
            if self.grad_calls and self._call is None:  # a predicate refused every call
                raise RuntimeError(
                    f"`align_call`: the predicate accepted none of the {self.grad_calls} denoiser calls with gradients "
                    "in this training step, so nothing was aligned: it must return True for the call to align"
                )
            if not self.grad_calls and self.calls_without_grad:
                raise RuntimeError(
                    f"the denoiser ({type(self.denoiser).__name__}) ran {self.calls_without_grad} time without gradients "
                    "in this training step and never with them, so the alignment loss cannot reach it: torch.no_grad "
                    "around the call, or a reentrant torch.utils.checkpoint around the whole denoiser call (its first "
                    "pass runs without gradients). Checkpoint with use_reentrant=False, or use the denoiser's own "
                    "enable_gradient_checkpointing()"
                )
            if index in self._without_grad:
                raise RuntimeError(
                    f"block {index} of family={self.family.name!r} ran without gradients inside the aligned denoiser "
                    "call: its output carries no graph, so the alignment loss could not reach the denoiser (only "
                    "the projector would learn). Causes: torch.no_grad around the block, a reentrant gradient "
                    "checkpoint that is not diffusers' own (use `denoiser.enable_gradient_checkpointing()`, "
                    "reentrant or not, or use_reentrant=False), or no trainable parameter before the block (align "
                    "a block after the trainable layers)"
                )
            raise RuntimeError(
                f"block {index} (of {len(self.blocks)}) of family={self.family.name!r} did not run in this training "
                f"step: call the denoiser ({type(self.denoiser).__name__}) inside training_step, through its forward"
                + (" (the denoiser ran, but not this block)" if self.grad_calls else "")
            )
        return self._captured.pop(index)

    def take_all(self, grid: Grid) -> Captured:
        """Every captured block (each an error if it never ran), on the student `grid`; nothing is kept."""
        captured = Captured({index: self.take(index) for index in self.indices}, grid)
        self.disarm()
        return captured

    # --- hooks ---------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._wrap_checkpointing()
        if not self._armed:
            return
        if self._with_grad and not torch.is_grad_enabled():
            self.calls_without_grad += 1  # a no-grad pass (self-conditioning, a target) gives no alignment gradient
            return
        self.grad_calls += 1
        call = call_arguments(module, args, kwargs)
        rule = self.align_call
        if rule == "last":
            chosen = True
            self._captured, self._without_grad = {}, set()
        elif rule == "first":
            chosen = self._call is None
        else:
            chosen = self._call is None and _accepts(rule, call)
        if chosen:
            self._call, self._active = call, True

    def _on_return(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._active = False

    def _store(self, index: int, output: Any) -> None:
        """Keep block `index`'s image tokens if they carry a graph (the first such output of the call)."""
        if index in self._captured:
            return
        spec = self.blocks[index][0]
        tokens = spec.select(spec.stream(output), self._num_tokens, self._call)  # (B, N, D)
        if tokens.shape[1] != self._num_tokens:
            raise RuntimeError(
                f"family={self.family.name!r}, block {index}: expected {self._num_tokens} image tokens from the "
                f"latent grid, the block's image stream has {tokens.shape[1]}; are the batch latents the ones "
                "the denoiser was called with?"
            )
        if self._with_grad and not tokens.requires_grad:  # no_grad, a reentrant checkpoint's first pass, ...
            self._without_grad.add(index)
            return
        self._captured[index] = tokens
        self._without_grad.discard(index)

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._active:
                self._store(index, output)

        return hook

    def _wrap_checkpointing(self) -> None:
        """Route the result of diffusers' checkpoint function (`_gradient_checkpointing_func`, set by
        `enable_gradient_checkpointing`) for our blocks to the capture: under a reentrant checkpoint
        only that result carries the graph."""
        for module in self._checkpoint_owners:  # diffusers modules that can checkpoint their children
            original = module.__dict__.get("_gradient_checkpointing_func")
            if original is None or getattr(original, "_repa_capture", None) is self:
                continue

            def checkpointed(block: nn.Module, *args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                output = _original(block, *args, **kwargs)
                index = self._index_of.get(id(block))
                if index is not None and self._active:
                    self._store(index, output)
                return output

            checkpointed._repa_capture = self  # type: ignore[attr-defined]
            self._checkpointing.setdefault(module, original)
            module._gradient_checkpointing_func = checkpointed


def _accepts(rule: Callable[[dict[str, Any]], bool], call: dict[str, Any]) -> bool:
    """An `align_call` predicate's answer; a missing argument is an error that lists the call's arguments."""
    try:
        return bool(rule(call))
    except KeyError as error:
        raise KeyError(f"`align_call`: the predicate read the argument {error}, which this denoiser call does not "
                       f"have; the arguments of this call: {', '.join(sorted(call))}") from None
