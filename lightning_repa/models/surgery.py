"""Module surgery: finding the denoiser, and instance-level wrappers we can take off again. No Lightning.

Everything the callback does to the user's LightningModule goes through here, so that it can be
undone exactly (at fit end, or when the fit fails).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from lightning_repa.models.families import Family

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


def require_denoiser(module: nn.Module, family: Family, path: Optional[str] = None) -> nn.Module:
    """The denoiser of `family`, unwrapped from torch.compile, PEFT and DDP/FSDP wrappers: `module`
    itself when it is of the family's class (and no `path` is given), else the module at `path` or
    at the first of `DENOISER_ATTRS`; errors name where it was looked for and the fix."""
    inner = unwrap(module)
    if path is None and {c.__name__ for c in type(inner).__mro__} & set(family.classes):
        return inner
    denoiser, found_at = find_denoiser(module, path)
    if denoiser is None and path is None and not hasattr(inner, "training_step"):
        family.check_class(inner)  # handed a model, not a LightningModule: say what it is
    if denoiser is None:
        where = f"`{path}`" if path else ", ".join(f"`{a}`" for a in DENOISER_ATTRS)
        raise ValueError(
            f"RepaCallback found no denoiser on {type(module).__name__} (looked at {where}); "
            "set `denoiser` to the dotted path of your transformer, e.g. denoiser='model.net'"
        )
    try:
        family.check_class(denoiser)
    except ValueError as error:
        how = "the `denoiser` option" if path else f"the default search ({', '.join(DENOISER_ATTRS)}, the first found)"
        raise ValueError(
            f"{error}. The module was found at `{found_at}` by {how}; set `denoiser` to the dotted path of the "
            f"{'/'.join(family.classes)} inside your LightningModule (e.g. denoiser='model.transformer')"
        ) from None
    return denoiser
