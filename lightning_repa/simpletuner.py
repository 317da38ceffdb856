"""Import SimpleTuner's representation-alignment settings: one line to switch.

::

    callbacks = from_simpletuner("config/config.json", encoder_checkpoint="dinov2_vitg14.pth")
    trainer = L.Trainer(max_steps=10_000, callbacks=callbacks)

`config` is a dict or the path of a SimpleTuner `config.json` / `config.toml`; keys may keep
SimpleTuner's leading `--`. Keys outside `crepa_` / `urepa_` / `irepa_` / `layersync_` are ignored,
except `model_family` and `model_flavour`, which pick the family (`family=` in the overrides wins).
There is one callback per enabled method, each built from a dict of `RepaCallback` options
(`simpletuner_options`, the form the Hydra app lays its `repa.*` overrides on, `with_overrides`);
the overrides go to every callback, except that an encoder-only override (`ENCODER_ONLY_OPTIONS`)
skips a backbone-teacher callback (LayerSync) when another callback has an encoder teacher.

Family (`simpletuner_keys.FAMILY_NAMES`): flux, flux2, chroma, sd3, auraflow, hidream, lumina2, sana,
z_image keep their names; pixart_sigma -> pixart, qwen_image -> qwenimage, sd1x / sd2x / legacy -> sd15
(the SD UNet family), sdxl, kolors; wan, ltxvideo, sanavideo; ltxvideo2 -> ltx2, kandinsky5-video ->
kandinsky5_video, hunyuanvideo -> hunyuan_video15. `model_flavour` decides only where `FLAVOURS` says so.

`crepa_enabled` -> REPA on an image DiT, CREPA on a video DiT (refused on a UNet):
    crepa_block_index -> block_index (absent: the family default; SimpleTuner requires it)
    crepa_lambda -> lam                      crepa_spatial_align -> spatial_align
    crepa_adjacent_distance -> distance      crepa_adjacent_tau -> tau
    crepa_cumulative_neighbors -> cumulative_neighbours
    crepa_normalize_neighbour_sum -> normalize_neighbours
    crepa_normalize_by_frames -> normalize_by_frames   (these five: video families only; on an image
        family SimpleTuner sees one frame, so a non-default value is dropped with a warning)
    crepa_model, else crepa_encoder -> encoder, SimpleTuner's aliases resolved (dino_v2_g, dinov2_g,
        dinov2-vitg14 -> dinov2_vitg14; dino_v2_s, dinov2_s -> dinov2_vits14; dinov2-vitb14 ->
        dinov2_vitb14); absent: dinov2_vitg14, SimpleTuner's default. A Qwen-VL teacher is refused.
    crepa_encoder_image_size -> encoder_image_size (absent: 518, SimpleTuner's default)
    crepa_encoder_frames_batch_size -> encoder_batch_size (<= 0, SimpleTuner's "all at once": 0)
    crepa_use_tae -> decoder="tae" (needs tae_checkpoint=)   crepa_drop_vae_encoder -> drop_vae_encoder
    crepa_feature_source: encoder / external -> teacher="encoder"; backbone / internal -> teacher="backbone";
        self_flow refused. Legacy crepa_use_backbone_features=true -> teacher="backbone"; crepa_self_flow=true
        refused (crepa_self_flow_mask_ratio is then ignored). crepa_teacher_block_index -> teacher_block_index
        (required with a backbone teacher: SimpleTuner's fallback to the student block is a no-op)
    crepa_scheduler -> schedule   crepa_warmup_steps -> warmup_steps   crepa_decay_steps -> decay_steps
    crepa_lambda_end -> lambda_end   crepa_power -> power   crepa_cutoff_step -> cutoff_step
    crepa_similarity_threshold -> similarity_threshold   crepa_similarity_ema_decay -> similarity_ema_decay
    crepa_threshold_mode -> threshold_mode
`urepa_enabled` -> U-REPA on a UNet (refused on a DiT): urepa_lambda -> lam, urepa_manifold_weight ->
    manifold_weight, urepa_model (else crepa_model, else crepa_encoder) -> encoder, urepa_encoder_image_size
    -> encoder_image_size (absent: 518), urepa_use_tae -> decoder="tae", and the nine urepa_ schedule keys as
    the crepa_ ones.
`irepa_enabled` -> irepa=True on the crepa_ / urepa_ callback; irepa_spatial_norm_alpha -> irepa_alpha,
    irepa_projector_kernel_size -> irepa_kernel_size.
`layersync_enabled` -> the LayerSync preset (teacher="backbone", projector="identity"; distance=0 on video
    families, every frame's tokens against the same frame's): layersync_student_block -> block_index and
    layersync_teacher_block -> teacher_block_index, resolved as SimpleTuner does (k >= 1 is 1-based, block
    k - 1; 0 is block 0); layersync_lambda -> lam (absent: 0.2). A teacher unset or not deeper is refused;
    layersync_detach_teacher=false warns (the teacher is always detached).

Deliberate differences (SPEC 12) keep our behaviour and warn once, naming the key: urepa_manifold_weight=0
and layersync_lambda=0 stay 0; the teacher is the encoder's patch tokens, not the CLS token; decay_steps=0
decays until the Trainer's max_steps, and a decay starts after warm-up; the similarity cutoff reads the mean
self-similarity once per optimizer step; an unknown scheduler or threshold mode is an error. Unknown
crepa_/urepa_/irepa_/layersync_ keys are named in a warning.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Union

from lightning_repa.simpletuner_keys import (
    CREPA_KEYS, DEFAULT_ENCODER, ENCODER_ALIASES, ENCODER_ONLY_OPTIONS, FAMILY_NAMES, FEATURE_SOURCES, FLAVOURS,
    IREPA_KEYS, KNOWN_KEYS, LAYERSYNC_LAMBDA, PREFIXES, UREPA_KEYS, Key, to_bool, to_float, to_int,
)

__all__ = ["from_simpletuner", "load_config", "simpletuner_options", "with_overrides"]

ConfigLike = Union[Mapping[str, Any], str, os.PathLike]


def from_simpletuner(config: ConfigLike, **overrides: Any) -> list:
    """`RepaCallback`s for the methods a SimpleTuner config enables, `overrides` laid on each.

    Raises:
        ValueError: a setting we refuse (self_flow, a Qwen-VL teacher, a no-op teacher block, a
            method that does not fit the family), an unknown family, scheduler or threshold mode.
    """
    from lightning_repa import RepaCallback

    options = simpletuner_options(config, family=overrides.get("family"), stacklevel=3)
    return [RepaCallback(**o) for o in with_overrides(options, overrides)]


def simpletuner_options(config: ConfigLike, family: Any = None, stacklevel: int = 2) -> list[dict[str, Any]]:
    """The `RepaCallback` keyword options of each callback a SimpleTuner config enables, in SimpleTuner's
    order (crepa_ or urepa_, then layersync_); `family` replaces `model_family` when given."""
    settings = load_config(config)
    notes: Notes = {}
    fam, family_value = _family(settings, family)
    irepa = _irepa(settings, notes)
    crepa, urepa, layersync = (_enabled(settings, f"{m}_enabled") for m in ("crepa", "urepa", "layersync"))
    if irepa and not (crepa or urepa):
        raise ValueError("`irepa_enabled` upgrades crepa_enabled (transformers) or urepa_enabled (UNets); "
                         "enable the one that fits the model")
    options = []
    if crepa:
        options.append({**_crepa(settings, fam, family_value, notes), **irepa})
    if urepa:
        options.append({**_urepa(settings, fam, family_value, notes), **irepa})
    if layersync:
        options.append(_layersync(settings, fam, family_value, notes))
    _unknown_keys(settings, notes)
    if not options:
        raise ValueError("the SimpleTuner config enables no alignment method: set crepa_enabled, urepa_enabled "
                         "or layersync_enabled")
    for message in notes.values():
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
    return options


def with_overrides(options: list[dict[str, Any]], overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each callback's options with `overrides` on top (see the module docstring for the one exception)."""
    encoder_users = any(o.get("teacher", "encoder") == "encoder" for o in options)
    merged = []
    for own in options:
        skip = ENCODER_ONLY_OPTIONS if own.get("teacher") == "backbone" and encoder_users else ()
        result = {**own, **{k: v for k, v in overrides.items() if k not in skip}}
        if own.get("decoder") == "tae" and result.get("decoder") == "tae" and not result.get("tae_checkpoint"):
            raise ValueError("`crepa_use_tae` / `urepa_use_tae` = true maps to decoder='tae', which needs the tiny "
                             "autoencoder's weights (SimpleTuner fetched them itself): pass tae_checkpoint=PATH, "
                             "or decoder='vae' to decode with the module's VAE")
        merged.append(result)
    return merged


# --- reading the config ---------------------------------------------------------------------------


def load_config(config: ConfigLike) -> dict[str, Any]:
    """The config's keys without SimpleTuner's leading `--`; unset values (null, "", "none") dropped."""
    if isinstance(config, Mapping):
        raw = dict(config)
    elif isinstance(config, (str, os.PathLike)):
        raw = _read(Path(config))
    else:
        raise TypeError(f"`config` must be a dict or the path of a SimpleTuner config.json / config.toml, "
                        f"got {type(config).__name__}")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).lstrip("-")
        if _unset(value):
            continue
        if name in settings and settings[name] != value:
            raise ValueError(f"`{name}` is given twice, with and without `--`, with different values "
                             f"({settings[name]!r} and {value!r}); keep one")
        settings[name] = value
    return settings


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"SimpleTuner config {str(path)!r} not found (a config.json or config.toml)")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise RuntimeError(f"reading {path.name} needs Python 3.11 or later (tomllib); convert it to JSON or "
                               "pass the settings as a dict") from None
        data = tomllib.loads(path.read_text())
    else:
        raise ValueError(f"SimpleTuner config {str(path)!r}: expected a .json or .toml file")
    if not isinstance(data, dict):
        raise ValueError(f"SimpleTuner config {str(path)!r} must hold a table of keys, got {type(data).__name__}")
    return data


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def _enabled(settings: dict[str, Any], key: str) -> bool:
    return key in settings and to_bool(key, settings[key])


Notes = dict[str, str]  # the import's warnings: SimpleTuner key -> its first message, emitted on success


# --- family ---------------------------------------------------------------------------------------


def _family(settings: dict[str, Any], override: Any) -> tuple[Any, Any]:
    """Our `Family` and the value for the `family` option: the override, or `model_family` mapped."""
    if override is not None:
        return _our_family(override), override
    if "model_family" not in settings:
        raise ValueError("the SimpleTuner config has no `model_family`: pass family=<one of "
                         f"{', '.join(sorted(set(FAMILY_NAMES.values())))}> to from_simpletuner")
    name = str(settings["model_family"]).strip().lower()
    flavour = str(settings.get("model_flavour", "")).strip().lower()
    ours = next((f for prefix, f in FLAVOURS.get(name, ()) if flavour.startswith(prefix)), FAMILY_NAMES.get(name))
    if ours is None:
        close = difflib.get_close_matches(name, list(FAMILY_NAMES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"SimpleTuner model_family={name!r} has no family here{hint} (known: "
                         f"{', '.join(FAMILY_NAMES)}); for another diffusers denoiser pass family= a family of "
                         "lightning_repa.FAMILIES or a declared family dict")
    return _our_family(ours), ours


def _our_family(family: Any) -> Any:
    """A family of `lightning_repa.FAMILIES` by name, one declared as a dict, or a `Family` as given."""
    from lightning_repa import FAMILIES, family_from_dict

    if isinstance(family, Mapping):
        return family_from_dict(family)
    if isinstance(family, str) and family not in FAMILIES:
        raise ValueError(f"unknown `family` {family!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[family] if isinstance(family, str) else family


# --- methods --------------------------------------------------------------------------------------


def _crepa(settings: dict[str, Any], fam: Any, family: Any, notes: Notes) -> dict[str, Any]:
    if fam.method.value == "urepa":
        raise ValueError(f"`crepa_enabled` aligns transformer blocks, but family {fam.name!r} is a UNet: use "
                         "urepa_enabled (U-REPA, the mid block) instead")
    teacher = _crepa_teacher(settings, notes)
    options: dict[str, Any] = {"family": family}
    _apply(CREPA_KEYS, settings, options, notes, fam, teacher)
    if teacher == "backbone":
        options["teacher"] = "backbone"
        if "teacher_block_index" not in options:
            raise ValueError("a backbone teacher needs `crepa_teacher_block_index` (a block deeper than "
                             "crepa_block_index); SimpleTuner then aligns the student block with itself, a no-op")
    else:
        options["encoder"] = _encoder(settings, ("crepa_model", "crepa_encoder"), notes)
    _schedule_notes("crepa", options, notes)
    return options


def _crepa_teacher(settings: dict[str, Any], notes: Notes) -> str:
    """encoder | backbone, from crepa_feature_source or the legacy boolean; self_flow is refused."""
    if _enabled(settings, "crepa_self_flow"):
        raise ValueError("`crepa_self_flow=true` (Self-Flow, an EMA teacher on a cleaner view) is not supported "
                         "yet: use crepa_feature_source=encoder or backbone")
    legacy = _enabled(settings, "crepa_use_backbone_features")
    if "crepa_feature_source" not in settings:
        teacher = "backbone" if legacy else "encoder"
    else:
        source = str(settings["crepa_feature_source"]).strip().lower()
        if source == "self_flow":
            raise ValueError("`crepa_feature_source=self_flow` (Self-Flow, an EMA teacher on a cleaner view) is "
                             "not supported yet: use encoder (a frozen DINOv2) or backbone (a deeper block)")
        if source not in FEATURE_SOURCES:
            raise ValueError(f"`crepa_feature_source`={source!r} is not one of "
                             f"{', '.join(FEATURE_SOURCES)} (self_flow is not supported yet)")
        teacher = FEATURE_SOURCES[source]
        if legacy and teacher != "backbone":
            raise ValueError(f"`crepa_use_backbone_features=true` contradicts `crepa_feature_source={source}`: "
                             "keep crepa_feature_source and drop the legacy flag")
    ratio = settings.get("crepa_self_flow_mask_ratio")
    if ratio is not None and to_float("crepa_self_flow_mask_ratio", ratio) != 0.1:
        notes.setdefault("crepa_self_flow_mask_ratio",
                         "`crepa_self_flow_mask_ratio` is only read by Self-Flow; ignored")
    return teacher


def _urepa(settings: dict[str, Any], fam: Any, family: Any, notes: Notes) -> dict[str, Any]:
    if fam.method.value != "urepa":
        raise ValueError(f"`urepa_enabled` is U-REPA for UNets (sdxl, sd15, kolors), but family {fam.name!r} is a "
                         f"{'video ' if fam.video else ''}DiT: use crepa_enabled instead")
    options: dict[str, Any] = {"family": family}
    _apply(UREPA_KEYS, settings, options, notes, fam, "encoder")
    if options.get("manifold_weight") == 0:
        notes.setdefault("urepa_manifold_weight",
                         "`urepa_manifold_weight=0` stays 0 (no manifold term); SimpleTuner silently uses 3.0 instead")
    options["encoder"] = _encoder(settings, ("urepa_model", "crepa_model", "crepa_encoder"), notes)
    _schedule_notes("urepa", options, notes)
    return options


def _layersync(settings: dict[str, Any], fam: Any, family: Any, notes: Notes) -> dict[str, Any]:
    if fam.method.value == "urepa":
        raise ValueError(f"LayerSync aligns two transformer blocks, but family {fam.name!r} is a UNet (SimpleTuner "
                         "has no LayerSync for UNets either): drop layersync_enabled")
    if "layersync_student_block" not in settings:
        raise ValueError("`layersync_enabled` needs `layersync_student_block` (as in SimpleTuner)")
    student = _layersync_block(settings, "layersync_student_block")
    if "layersync_teacher_block" not in settings:
        raise ValueError("`layersync_teacher_block` is unset: SimpleTuner then aligns the student block with "
                         "itself, a no-op; set it to a deeper block")
    teacher = _layersync_block(settings, "layersync_teacher_block")
    if teacher <= student:
        raise ValueError(
            f"`layersync_teacher_block`={settings['layersync_teacher_block']} (block {teacher}) must be deeper "
            f"than `layersync_student_block`={settings['layersync_student_block']} (block {student}): a teacher "
            "at or before the student aligns nothing")
    lam = LAYERSYNC_LAMBDA
    if "layersync_lambda" in settings:
        lam = to_float("layersync_lambda", settings["layersync_lambda"])
        if lam == 0:
            notes.setdefault("layersync_lambda", "`layersync_lambda=0` stays 0 (LayerSync adds nothing); "
                             f"SimpleTuner replaces 0 with {LAYERSYNC_LAMBDA} (or refuses it)")
    if "layersync_detach_teacher" in settings and not to_bool("layersync_detach_teacher",
                                                               settings["layersync_detach_teacher"]):
        notes.setdefault("layersync_detach_teacher", "`layersync_detach_teacher=false`: the teacher block is "
                         "always detached here, as in LayerSync and SimpleTuner's current code")
    options = {"family": family, "block_index": student, "teacher": "backbone", "teacher_block_index": teacher,
               "projector": "identity", "lam": lam}
    if fam.video:
        options["distance"] = 0  # one cosine over all tokens, no neighbour frames (SimpleTuner's LayerSync)
    return options


def _layersync_block(settings: dict[str, Any], key: str) -> int:
    """SimpleTuner tries block k - 1 first (the paper's 1-based depth), then k: k >= 1 -> k - 1, 0 -> 0."""
    k = to_int(key, settings[key])
    if k < 0:
        raise ValueError(f"`{key}` must be >= 0, got {k}")
    return k - 1 if k > 0 else 0


def _irepa(settings: dict[str, Any], notes: Notes) -> dict[str, Any]:
    """{"irepa": True, ...} to add to the crepa_ / urepa_ callback, or {} when iREPA is off."""
    if not _enabled(settings, "irepa_enabled"):
        for key, spec in IREPA_KEYS.items():
            if key in settings and spec.convert(key, settings[key]) != spec.default:
                notes.setdefault(key, f"`{key}` is only read with irepa_enabled=true; ignored")
        return {}
    options: dict[str, Any] = {"irepa": True}
    for key, spec in IREPA_KEYS.items():
        if key in settings:
            options[spec.option] = spec.convert(key, settings[key])
    return options


# --- keys -----------------------------------------------------------------------------------------


def _apply(table: dict[str, Key], settings: dict[str, Any], options: dict[str, Any], notes: Notes, fam: Any,
           teacher: str) -> None:
    """Convert the keys of `table` into `options`; a key that does not apply here is dropped (with a
    warning unless it holds SimpleTuner's default)."""
    for key, spec in table.items():
        reason = (f"has no effect on {fam.name!r}, an image family (SimpleTuner sees one frame)"
                  if spec.video and not fam.video else
                  f"is only read with a {spec.teacher} teacher, and this one is the {teacher}"
                  if spec.teacher not in (None, teacher) else None)
        if key not in settings:
            if spec.fill and reason is None:
                options[spec.option] = spec.default
            continue
        value = spec.convert(key, settings[key])
        if reason is not None:
            default = None if spec.default is None else spec.convert(key, spec.default)
            if value != default:
                notes.setdefault(key, f"`{key}`={settings[key]!r} {reason}; ignored")
            continue
        if value is not None:
            options[spec.option] = value


def _encoder(settings: dict[str, Any], keys: tuple[str, ...], notes: Notes) -> str:
    """The teacher encoder from the first of `keys` that is set, SimpleTuner's aliases resolved."""
    key = next((k for k in keys if k in settings), keys[0])
    raw = str(settings.get(key, DEFAULT_ENCODER)).strip()
    if "qwen" in raw.lower():
        raise ValueError(f"`{key}`={raw!r}: Qwen-VL teachers are not supported yet; use a DINOv2 encoder "
                         "(dinov2_vit{s,b,l,g}14[_reg]) or any timm ViT")
    name = ENCODER_ALIASES.get(raw.lower(), raw)
    default = "" if key in settings else " (SimpleTuner default)"
    notes.setdefault(key, f"`{key}`={name!r}{default}: the teacher here is the encoder's patch tokens; SimpleTuner's "
                     "torch-hub DINOv2 returns the CLS token alone, so its alignment compared the pooled student "
                     "with one global vector (SPEC 12.1)")
    return name


def _schedule_notes(prefix: str, options: dict[str, Any], notes: Notes) -> None:
    """Warn where our schedule or cutoff reads a SimpleTuner value differently."""
    warmup, decay = options.get("warmup_steps", 0), options.get("decay_steps", 0)
    if options.get("schedule", "constant") != "constant":
        if decay == 0:
            notes.setdefault(f"{prefix}_decay_steps", f"`{prefix}_decay_steps=0`: the decay runs until the "
                             "Trainer's max_steps, as SimpleTuner documents (give the Trainer max_steps); "
                             "SimpleTuner's code uses the max_train_steps it was built with, and a one-step decay "
                             "without one")
        elif warmup > 0:
            notes.setdefault(f"{prefix}_decay_steps", f"`{prefix}_decay_steps={decay}` with `{prefix}_warmup_steps="
                             f"{warmup}`: the decay ends at step {warmup + decay}, after warm-up as SimpleTuner "
                             f"documents; SimpleTuner's code ends it at step {decay} (pass "
                             f"decay_steps={max(decay - warmup, 1)} for that)")
    if options.get("similarity_threshold") is not None:
        notes.setdefault(f"{prefix}_similarity_threshold", f"`{prefix}_similarity_threshold`: the cutoff EMA "
                         "follows the mean self-similarity (in [-1, 1]) once per optimizer step, over micro-batches "
                         "and ranks; SimpleTuner updates it per micro-batch on each rank, for CREPA with the "
                         "neighbour-weighted score (which can exceed 1), so the cutoff may come at another step")


def _unknown_keys(settings: dict[str, Any], notes: Notes) -> None:
    for key, value in settings.items():
        if key.startswith(PREFIXES) and key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            notes.setdefault(key, f"unknown SimpleTuner key `{key}`={value!r} is not imported{hint}")
