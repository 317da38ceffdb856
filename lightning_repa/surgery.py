"""Module surgery: finding the denoiser, and instance-level wrappers we can take off again. No Lightning.

Everything the callback does to the user's LightningModule goes through here, so that it can be
undone exactly (at fit end, or when the fit fails).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

DENOISER_ATTRS = ("denoiser", "transformer", "unet", "model")
"""Where the denoiser is looked for on the LightningModule, in this order (or `denoiser=` a dotted path)."""

# Wrappers that hold the real denoiser: torch.compile, PEFT, DDP/FSDP-style `.module`.
_WRAPPED = (("OptimizedModule", "_orig_mod"), ("PeftModel", "base_model.model"),
            ("PeftModelForCausalLM", "base_model.model"), ("DistributedDataParallel", "module"),
            ("FullyShardedDataParallel", "module"))


def get_path(root: Any, path: str) -> Any:
    """`root.a.b.c` for path "a.b.c"; None where a part is missing."""
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside torch.compile / PEFT / DDP / FSDP wrappers (unchanged when not wrapped)."""
    seen = 0
    while seen < 8:
        names = {cls.__name__ for cls in type(module).__mro__}
        inner = next((get_path(module, path) for cls, path in _WRAPPED if cls in names), None)
        if not isinstance(inner, nn.Module):
            return module
        module, seen = inner, seen + 1
    return module


def find_denoiser(module: nn.Module, path: Optional[str]) -> tuple[Optional[nn.Module], str]:
    """(the denoiser, unwrapped, and the path it was found at), or (None, "") when there is none."""
    for candidate in [path] if path else DENOISER_ATTRS:
        found = get_path(module, candidate)
        if isinstance(found, nn.Module):
            return unwrap(found), candidate
    return None, ""


class InstanceWrappers:
    """Instance attributes that shadow methods of one module (e.g. `training_step`), removable."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._installed: dict[str, Callable] = {}

    def install(self, name: str, wrapper: Callable) -> None:
        self.module.__dict__[name] = self._installed[name] = wrapper

    def remove(self) -> None:
        """Take off our wrappers (and only ours: a wrapper someone put over ours stays)."""
        for name, wrapper in self._installed.items():
            if self.module.__dict__.get(name) is wrapper:
                del self.module.__dict__[name]
        self._installed.clear()


@contextmanager
def plain_tensor_init() -> Iterator[None]:
    """float32 on the CPU, whatever init context the Trainer is in (inside `configure_model` the
    strategy sets the device and, for "bf16-true", the default dtype): the frozen teacher is built
    in full precision and moved to the module's device at fit start."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)
