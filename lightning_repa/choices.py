"""The vocabulary every layer shares: the options' choices (string enums) and the ranges of the
numeric options. A leaf: it imports nothing of the package, so the maths, the model adapters, the
objectives and the configuration can all use it without importing each other."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Callable

class Choice(str, Enum):
    """A string enum whose constructor error names the option and the choices."""

    def __str__(self) -> str:  # the value, as written in options and on the command line
        return self.value

    @classmethod
    def parse(cls, value: Any, option: str) -> "Choice":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(repr(c.value) for c in cls)
            raise ValueError(f"`{option}` must be one of {choices}, got {value!r}") from None


class Method(Choice):
    repa = "repa"  # image DiTs: one block's image tokens
    urepa = "urepa"  # UNets: mid-block features, cosine + manifold loss
    crepa = "crepa"  # video DiTs: per-frame tokens, neighbour frames


class Projector(Choice):
    linear = "linear"  # LayerNorm(hidden) -> Linear(hidden, enc_dim)
    mlp = "mlp"  # REPA paper: Linear-SiLU-Linear-SiLU-Linear, width projector_hidden
    conv = "conv"  # iREPA: Conv2d on the token grid, per frame
    identity = "identity"  # no projection (LayerSync: a deeper block of the same width as teacher)


class Teacher(Choice):
    encoder = "encoder"  # frozen vision encoder on the decoded clean image
    backbone = "backbone"  # a deeper block of the same forward, detached


class Decoder(Choice):
    vae = "vae"  # the module's resident VAE (`vae_attr`)
    tae = "tae"  # a tiny autoencoder loaded from `tae_checkpoint`
    pixels = "pixels"  # the batch already holds clean images (`pixels_key`)


class Cache(Choice):
    none = "none"
    memory = "memory"
    disk = "disk"


class ManifoldScope(Choice):
    tokens = "tokens"  # token-pair Gram matrices within each sample (seed's form)
    batch = "batch"  # sample-pair Gram matrix over the batch (U-REPA paper's wording)


class DistanceUnit(Choice):
    latent = "latent"
    pixel = "pixel"


class ScheduleKind(Choice):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"
    polynomial = "polynomial"


class ThresholdMode(Choice):
    permanent = "permanent"  # once the similarity EMA reaches the threshold, off for good
    recoverable = "recoverable"  # off while the EMA is at or above the threshold


def require(ok: bool, option: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"`{option}` must be {expected}, got {value!r}")


def _int(test: Callable[[int], bool]) -> Callable[[Any], bool]:
    return lambda v: not isinstance(v, bool) and isinstance(v, int) and test(v)


def _num(test: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and test(v)


# The range of every numeric option, checked here only (by `RepaConfig.validate` and by the
# schedule classes when used on their own): option -> (test, what is expected).
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lam": (_num(lambda v: v >= 0), "a weight >= 0"),
    "block_index": (lambda v: v is None or _int(lambda i: i >= 0)(v), "an integer >= 0 (None: the family default)"),
    "projector_hidden": (_int(lambda v: v > 0), "an integer > 0"),
    "encoder_image_size": (_int(lambda v: v > 0), "an integer > 0"),
    "encoder_batch_size": (_int(lambda v: v >= 0), "an integer >= 0 (0: the whole batch)"),
    "manifold_weight": (_num(lambda v: v >= 0), ">= 0"),
    "distance": (_int(lambda v: v >= 0), "an integer >= 0"),
    "tau": (_num(lambda v: v > 0), "> 0"),
    "irepa_alpha": (_num(lambda v: 0 <= v <= 1), "in [0, 1]"),
    "irepa_kernel_size": (_int(lambda v: v > 0 and v % 2 == 1), "an odd integer > 0"),
    "warmup_steps": (_int(lambda v: v >= 0), "an integer >= 0"),
    "decay_steps": (_int(lambda v: v >= 0), "an integer >= 0 (0: until max_steps)"),
    "lambda_end": (_num(lambda v: v >= 0), "a weight >= 0"),
    "power": (_num(lambda v: v > 0), "> 0"),
    "cutoff_step": (_int(lambda v: v >= 0), "an integer >= 0 (0: never)"),
    "max_nonfinite_steps": (_int(lambda v: v > 0), "an integer > 0"),
    "cknna_every_n_steps": (_int(lambda v: v >= 0), "an integer >= 0 (0: off)"),
    "frames_per_latent": (lambda v: v is None or _int(lambda i: i >= 1)(v),
                          "an integer >= 1 (None: the VAE's or the family's)"),
    "similarity_ema_decay": (_num(lambda v: 0 < v < 1), "in (0, 1)"),
    "similarity_threshold": (
        lambda v: v is None or _num(lambda t: -1 <= t <= 1)(v), "a cosine similarity in [-1, 1], or None (never)"
    ),
}


def check_option(option: str, value: Any) -> None:
    """Raise a ValueError naming `option` when `value` is not finite or outside its range (`RANGES`)."""
    test, expected = RANGES[option]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"`{option}` must be finite ({expected}), got {value!r}")
    require(test(value), option, value, expected)
