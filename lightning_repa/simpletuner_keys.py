"""The tables of the SimpleTuner importer (`lightning_repa.simpletuner`): SimpleTuner's option keys
and model families, each with what it becomes here. Standard library only.

Key names, defaults and semantics follow SimpleTuner's source (`simpletuner/helpers/training/crepa.py`,
`layersync.py`, the option registry `field_registry/sections/loss.py`) and its `OPTIONS.md` / iREPA pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

Convert = Callable[[str, Any], Any]  # (SimpleTuner key, raw value) -> our option value

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"SimpleTuner key `{key}` must be true or false, got {value!r}")


def to_int(key: str, value: Any) -> int:
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or float(number) != int(number):
        raise ValueError(f"SimpleTuner key `{key}` must be an integer, got {value!r}")
    return int(number)


def to_float(key: str, value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"SimpleTuner key `{key}` must be a number, got {value!r}") from None


def to_frames_batch(key: str, value: Any) -> int:
    """SimpleTuner: <= 0 encodes all frames at once (default -1); here that is 0."""
    return max(to_int(key, value), 0)


def to_tae(key: str, value: Any) -> Optional[str]:
    """`*_use_tae=true` decodes with a tiny autoencoder: decoder="tae" (false: the default, the VAE)."""
    return "tae" if to_bool(key, value) else None


def choice(option: str, names: tuple[str, ...]) -> Convert:
    """A string among `names`; anything else is an error (SimpleTuner silently uses the first)."""

    def convert(key: str, value: Any) -> str:
        name = str(value).strip().lower()
        if name not in names:
            raise ValueError(
                f"SimpleTuner key `{key}`={value!r} is not a known {option} ({', '.join(names)}); SimpleTuner "
                f"falls back to {names[0]!r} without a word, here it is an error: set one of them"
            )
        return name

    return convert


@dataclass(frozen=True)
class Key:
    """One SimpleTuner key that maps to one of our options by a converter."""

    option: str  # the RepaCallback option it sets
    convert: Convert
    default: Any  # SimpleTuner's default (a key equal to it that does not apply is dropped quietly)
    video: bool = False  # read on video families only (on image families SimpleTuner sees one frame)
    teacher: Optional[str] = None  # read only with this teacher ("encoder" or "backbone")
    fill: bool = False  # absent: SimpleTuner's default is used, as it differs from ours


SCHEDULES = ("constant", "linear", "cosine", "polynomial")
THRESHOLD_MODES = ("permanent", "recoverable")


def schedule_keys(prefix: str) -> dict[str, Key]:
    """The coefficient schedule and cutoff keys, shared by `crepa_` and `urepa_`."""
    return {
        f"{prefix}_scheduler": Key("schedule", choice("scheduler", SCHEDULES), "constant"),
        f"{prefix}_warmup_steps": Key("warmup_steps", to_int, 0),
        f"{prefix}_decay_steps": Key("decay_steps", to_int, 0),
        f"{prefix}_lambda_end": Key("lambda_end", to_float, 0.0),
        f"{prefix}_power": Key("power", to_float, 1.0),
        f"{prefix}_cutoff_step": Key("cutoff_step", to_int, 0),
        f"{prefix}_similarity_threshold": Key("similarity_threshold", to_float, None),
        f"{prefix}_similarity_ema_decay": Key("similarity_ema_decay", to_float, 0.99),
        f"{prefix}_threshold_mode": Key("threshold_mode", choice("threshold mode", THRESHOLD_MODES), "permanent"),
    }


# REPA on image DiTs, CREPA on video DiTs (SimpleTuner's CrepaRegularizer does both).
CREPA_KEYS: dict[str, Key] = {
    "crepa_block_index": Key("block_index", to_int, None),
    "crepa_lambda": Key("lam", to_float, 0.5),
    "crepa_adjacent_distance": Key("distance", to_int, 1, video=True),
    "crepa_adjacent_tau": Key("tau", to_float, 1.0, video=True),
    "crepa_cumulative_neighbors": Key("cumulative_neighbours", to_bool, False, video=True),
    "crepa_normalize_neighbour_sum": Key("normalize_neighbours", to_bool, False, video=True),
    "crepa_normalize_by_frames": Key("normalize_by_frames", to_bool, True, video=True),
    "crepa_spatial_align": Key("spatial_align", to_bool, True),
    "crepa_encoder_image_size": Key("encoder_image_size", to_int, 518, teacher="encoder", fill=True),
    "crepa_encoder_frames_batch_size": Key("encoder_batch_size", to_frames_batch, -1, teacher="encoder"),
    "crepa_use_tae": Key("decoder", to_tae, False, teacher="encoder"),
    "crepa_drop_vae_encoder": Key("drop_vae_encoder", to_bool, False, teacher="encoder"),
    "crepa_teacher_block_index": Key("teacher_block_index", to_int, None, teacher="backbone"),
    **schedule_keys("crepa"),
}
# Read by rules in `lightning_repa.simpletuner`, not by a plain converter.
CREPA_RULES = ("crepa_enabled", "crepa_model", "crepa_encoder", "crepa_feature_source", "crepa_use_backbone_features",
               "crepa_self_flow", "crepa_self_flow_mask_ratio")

# U-REPA on UNets; the encoder name falls back to crepa_model, then crepa_encoder.
UREPA_KEYS: dict[str, Key] = {
    "urepa_lambda": Key("lam", to_float, 0.5),
    "urepa_manifold_weight": Key("manifold_weight", to_float, 3.0),
    "urepa_encoder_image_size": Key("encoder_image_size", to_int, 518, teacher="encoder", fill=True),
    "urepa_use_tae": Key("decoder", to_tae, False, teacher="encoder"),
    **schedule_keys("urepa"),
}
UREPA_RULES = ("urepa_enabled", "urepa_model")

# iREPA upgrades the crepa_ / urepa_ callback: conv projector, z-scored teacher.
IREPA_KEYS: dict[str, Key] = {
    "irepa_spatial_norm_alpha": Key("irepa_alpha", to_float, 0.6),
    "irepa_projector_kernel_size": Key("irepa_kernel_size", to_int, 3),
}
IREPA_RULES = ("irepa_enabled",)

LAYERSYNC_RULES = ("layersync_enabled", "layersync_student_block", "layersync_teacher_block", "layersync_lambda",
                   "layersync_detach_teacher")
LAYERSYNC_LAMBDA = 0.2  # SimpleTuner's (and the LayerSync paper's) weight when layersync_lambda is unset

KNOWN_KEYS = frozenset([*CREPA_KEYS, *CREPA_RULES, *UREPA_KEYS, *UREPA_RULES, *IREPA_KEYS, *IREPA_RULES,
                        *LAYERSYNC_RULES])
PREFIXES = ("crepa_", "urepa_", "irepa_", "layersync_")

# SimpleTuner's DINOv2 aliases (`_resolve_encoder_name`), matched lower-case; other names pass through.
ENCODER_ALIASES: dict[str, str] = {
    "dino_v2_g": "dinov2_vitg14",
    "dinov2_g": "dinov2_vitg14",
    "dinov2-vitg14": "dinov2_vitg14",
    "dino_v2_s": "dinov2_vits14",
    "dinov2_s": "dinov2_vits14",
    "dinov2-vitb14": "dinov2_vitb14",
}
DEFAULT_ENCODER = "dinov2_vitg14"  # SimpleTuner's default teacher (ours is dinov2_vits14)

# crepa_feature_source, with SimpleTuner's aliases -> our teacher; self_flow is refused.
FEATURE_SOURCES: dict[str, str] = {"encoder": "encoder", "external": "encoder", "backbone": "backbone",
                                   "internal": "backbone"}

# SimpleTuner model_family -> our family. sd1x and sd2x are the SD UNet family; SimpleTuner's older
# `legacy` family (SD 1.x / 2.x, the flavour picked the version) is the same one.
FAMILY_NAMES: dict[str, str] = {
    "flux": "flux", "flux2": "flux2", "chroma": "chroma", "sd3": "sd3", "auraflow": "auraflow",
    "hidream": "hidream", "lumina2": "lumina2", "sana": "sana", "pixart_sigma": "pixart",
    "qwen_image": "qwenimage", "z_image": "z_image",
    "sdxl": "sdxl", "sd1x": "sd15", "sd2x": "sd15", "legacy": "sd15", "kolors": "kolors",
    "wan": "wan", "ltxvideo": "ltxvideo", "ltxvideo2": "ltx2", "sanavideo": "sanavideo",
    "kandinsky5-video": "kandinsky5_video", "kandinsky5_video": "kandinsky5_video",
    "hunyuanvideo": "hunyuan_video15",
}
# Where model_flavour decides between our families: {model_family: ((flavour prefix, family), ...)},
# the first prefix that matches wins, "" matches any flavour. Flavours of one denoiser class (flux
# kontext, qwen_image edit, wan i2v, ...) keep the family: its token layout handles reference tokens.
FLAVOURS: dict[str, tuple[tuple[str, str], ...]] = {
    "legacy": (("1", "sd15"), ("2", "sd15"), ("", "sd15")),
}

# Options that only an encoder teacher reads: an override of one of them is not laid on a backbone-teacher
# callback (LayerSync) when another callback of the same import has an encoder teacher.
ENCODER_ONLY_OPTIONS = ("encoder", "encoder_checkpoint", "encoder_image_size", "encoder_batch_size", "decoder",
                        "vae_attr", "tae_checkpoint", "drop_vae_encoder", "pixels_key", "pixels_range", "cache",
                        "cache_dir", "ids_key", "views_key")
