"""Attaching to the user's LightningModule: the projector, the checks that it trains, the batch's
latents and the log names. No Lightning import: everything here works on modules, optimizers and
the batch."""

from __future__ import annotations

import zlib
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_repa.choices import Decoder
from lightning_repa.config import RepaConfig
from lightning_repa.models.surgery import get_path, plain_tensor_init, require_denoiser
from lightning_repa.objectives.projectors import build_projector
from lightning_repa.teachers.build import build_teacher
from lightning_repa.teachers.decoders import drop_vae_encoder
from lightning_repa.teachers.pixels import check_pixel_range


PROJECTOR_ATTR = "repa_projector"
"""Where the projector sits on the LightningModule (`repa_projector_<i>` when several callbacks align)."""


def is_projector_key(key: str) -> bool:
    """Whether a state-dict key of the LightningModule belongs to a REPA projector."""
    return key.split(".", 1)[0].rstrip("0123456789").rstrip("_") == PROJECTOR_ATTR


def projector_seed(attr: str) -> int:
    """The seed of a new projector's initialisation: the run's seed (`torch.initial_seed()`, which
    `seed_everything` sets) and the projector's attribute, so that two projectors differ and neither
    draws from the run's generators."""
    return (torch.initial_seed() + zlib.crc32(attr.encode())) % 2**63


def attach_projector(module: nn.Module, attr: str, cfg: RepaConfig, hidden: int, out_dim: int,
                     device: torch.device, teacher_name: str, seed: int) -> bool:
    """Put a new projector (hidden -> out_dim), initialised on the CPU from a generator of its own
    seeded with `seed`, at `module.<attr>`, or keep the one a previous fit or a checkpoint left
    there if its dimensions fit; True when a new one was attached."""
    existing = getattr(module, attr, None)
    if existing is None:
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(seed)
            projector = build_projector(cfg.projector, hidden, out_dim, cfg.projector_hidden, cfg.irepa_kernel_size)
        setattr(module, attr, projector.to(device))
        return True
    dims = (getattr(existing, "in_dim", None), getattr(existing, "out_dim", None))
    if dims != (hidden, out_dim):
        raise ValueError(
            f"`{attr}` on the module (kept from an earlier fit or a checkpoint) maps {dims[0]} -> {dims[1]}, but this "
            f"fit needs {hidden} -> {out_dim} (the denoiser's width {hidden}, the teacher {teacher_name!r} dimension "
            f"{out_dim}); delete `{attr}` to start a new projector, or align to the teacher it was trained with"
        )
    return False


def frozen_message(attr: str, what: str) -> str:
    return (
        f"the REPA projector (`{attr}`) {what}: it is frozen, so the alignment would pull the model towards a "
        f"fixed random projection. Something froze the whole module after the callback attached it (e.g. "
        f"`self.requires_grad_(False)` before adding LoRA adapters, or PEFT's get_peft_model on the module): "
        f"freeze only the denoiser (`self.transformer.requires_grad_(False)`), or call "
        f"`self.{attr}.requires_grad_(True)` after freezing, before the optimizer is built"
    )


def check_projector_trains(projector: nn.Module, attr: str, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """The projector must be trainable and in an optimizer (two causes, two messages)."""
    frozen = [n for n, p in projector.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(frozen_message(attr, f"has requires_grad=False ({', '.join(frozen)})"))
    optimised = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    if not all(id(p) in optimised for p in projector.parameters()):
        raise ValueError(
            f"the REPA projector (`{attr}`) is not in any optimizer: build the optimizer from "
            "`self.parameters()` in configure_optimizers (the callback attaches it in setup, before)"
        )


def batch_latents(batch: Any, cfg: RepaConfig) -> Tensor:
    """The clean training latents of a batch; errors name the option that sets the key."""
    key = cfg.latents_key
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"RepaCallback reads the clean latents from batch[{key!r}], but the batch is a {type(batch).__name__}; "
            "return a dict from your dataset/collate_fn"
        )
    if key not in batch:
        raise KeyError(
            f"batch has no {key!r} (keys: {sorted(batch)}); set `latents_key` to the key of the clean "
            "training-space latents"
        )
    if cfg.decoder is Decoder.pixels and cfg.pixels_key not in batch:
        raise KeyError(
            f"decoder=pixels reads batch[{cfg.pixels_key!r}], which is missing (keys: {sorted(batch)}); "
            "set `pixels_key` or use decoder=vae/tae"
        )
    return batch[key]


def log_prefixes(callbacks: list[tuple[Optional[str], str]]) -> list[str]:
    """Log prefixes of REPA callbacks given as (name option, teacher name): `repa` for a single
    unnamed one; else `repa/<name>`, the name defaulting to the teacher, numbered where two are alike."""
    if len(callbacks) == 1 and callbacks[0][0] is None:
        return ["repa"]
    names = [name or teacher for name, teacher in callbacks]
    seen: dict[str, int] = {}
    prefixes = []
    for name in names:
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}_{seen[name] - 1}"
        prefixes.append(f"repa/{name}")
    return prefixes


def attach(repa: Any, module: nn.Module) -> bool:
    """Build the teacher of callback `repa` and put its projector on `module` (right after the module's
    own `configure_model`); True when a new projector was attached. Nothing here draws from the run's
    random generators: the teacher is built inside a forked generator, the projector from its own seed."""
    cfg, family = repa.config, repa.family
    if cfg.drop_vae_encoder:  # before the optimizer and the checkpoint restore
        drop_vae_encoder(get_path(module, cfg.vae_attr), cfg.vae_attr)
    denoiser = require_denoiser(module, family, cfg.denoiser)
    with plain_tensor_init(), torch.random.fork_rng(devices=[]):
        repa.step.teacher = build_teacher(cfg, family, module, repa.build_encoder_once)
    hidden = family.hidden_size(denoiser)
    return attach_projector(module, repa.projector_attr, cfg, hidden, repa.step.teacher.embed_dim or hidden,
                            next(denoiser.parameters()).device, repa.teacher_name, projector_seed(repa.projector_attr))


def check_pixels(batch: Mapping[str, Any], cfg: RepaConfig) -> None:
    """decoder=pixels: the first batch's pixels have a dtype and a range the teacher reads as meant."""
    if cfg.decoder is Decoder.pixels:
        check_pixel_range(batch[cfg.pixels_key], cfg.pixels_range, cfg.pixels_key)


def has_validation(module: nn.Module, trainer: Any) -> bool:
    """Whether the fit runs a validation loop: a `validation_step` of the user's class, and batches."""
    overridden = any("validation_step" in vars(c) for c in type(module).__mro__
                     if not c.__module__.startswith(("lightning.", "pytorch_lightning.")))
    return overridden and trainer.limit_val_batches != 0
