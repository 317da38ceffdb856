"""The SimpleTuner importer (issue 21): real SimpleTuner configs per method, the key forms, every alias,
the deliberate differences and their warnings, the unknown-key warning, the refusals, and 2-step fits
from imported configs on a DiT, a UNet and a video DiT. Expected options are written out from
SimpleTuner's semantics (its crepa.py, layersync.py and OPTIONS.md), not computed by the importer."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_repa
from helpers import TinyFlow, TinyVideoFlow, loader, trainer, video_loader
from lightning_repa import FAMILIES, RepaCallback
from lightning_repa.schedule import WeightSchedule
from lightning_repa.simpletuner import from_simpletuner, simpletuner_options, with_overrides
from lightning_repa.simpletuner_keys import FAMILY_NAMES

DATA = Path(__file__).parent / "data" / "simpletuner"
CLS = "patch tokens"  # the CLS-token warning
EXPECTED = {
    "repa_flux.json": [dict(family="flux", block_index=8, lam=0.5, encoder="dinov2_vits14", encoder_image_size=224,
                            spatial_align=True, schedule="cosine", warmup_steps=100, decay_steps=5000, lambda_end=0.0)],
    "crepa_wan.json": [dict(family="wan", block_index=8, lam=0.5, distance=1, tau=1.0, cumulative_neighbours=False,
                            normalize_neighbours=False, normalize_by_frames=True, spatial_align=True,
                            encoder="dinov2_vits14", encoder_image_size=224, encoder_batch_size=0,
                            drop_vae_encoder=False, schedule="constant", cutoff_step=3000, similarity_threshold=0.9,
                            similarity_ema_decay=0.99, threshold_mode="recoverable")],
    "urepa_sdxl.json": [dict(family="sdxl", lam=0.5, manifold_weight=3.0, encoder="dinov2_vits14",
                             encoder_image_size=224, schedule="cosine", warmup_steps=0, decay_steps=1000,
                             lambda_end=0.0, cutoff_step=5000)],
    "layersync_pixart.json": [dict(family="pixart", block_index=7, teacher="backbone", teacher_block_index=15,
                                   projector="identity", lam=0.2)],
    "irepa_sd3.json": [dict(family="sd3", block_index=8, lam=1.0, encoder="dinov2_vitb14", encoder_image_size=224,
                            irepa=True, irepa_alpha=0.6, irepa_kernel_size=3)],
    "config.toml": [dict(family="ltxvideo", block_index=8, lam=0.5, distance=2, tau=1.5, cumulative_neighbours=True,
                         normalize_neighbours=True, encoder="dinov2_vitb14", encoder_image_size=224, schedule="cosine",
                         warmup_steps=100, decay_steps=0, lambda_end=0.1, similarity_threshold=0.85,
                         threshold_mode="permanent"),
                    dict(family="ltxvideo", block_index=3, teacher="backbone", teacher_block_index=11,
                         projector="identity", lam=0.2, distance=0)],
}
WARNED = {  # the SimpleTuner keys each fixture's warnings name
    "repa_flux.json": {"crepa_model", "crepa_decay_steps"},
    "crepa_wan.json": {"crepa_encoder", "crepa_similarity_threshold"},
    "urepa_sdxl.json": {"urepa_model"},
    "layersync_pixart.json": set(),
    "irepa_sd3.json": {"crepa_model"},
    "config.toml": {"crepa_model", "crepa_decay_steps", "crepa_similarity_threshold"},
}


def _options(config, **kwargs):
    """simpletuner_options and the warning messages it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = simpletuner_options(config, **kwargs)
    return options, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _import(config, **overrides):
    """from_simpletuner and the warning messages it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callbacks = from_simpletuner(config, **overrides)
    return callbacks, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _keys(messages):
    """The SimpleTuner key each warning names (its first `quoted` key, without a value)."""
    return {m.split("`")[1].split("=")[0] for m in messages}


# --- real configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_config_files_map_to_the_expected_options(name):
    options, messages = _options(DATA / name)
    assert options == EXPECTED[name]
    assert _keys(messages) == WARNED[name] and len(messages) == len(WARNED[name])  # once per key
    with warnings.catch_warnings(record=True):  # the same warnings, checked above
        warnings.simplefilter("always")
        callbacks = from_simpletuner(str(DATA / name))  # RepaConfig validates every imported option
    assert [cb.config.family for cb in callbacks] == [o["family"] for o in EXPECTED[name]]


def test_from_simpletuner_is_exported_at_the_top_level():
    assert lightning_repa.from_simpletuner is from_simpletuner


def test_dashed_and_undashed_keys_are_the_same_and_a_conflict_is_refused():
    plain = json.loads((DATA / "crepa_wan.json").read_text())
    dashed = {f"--{k}": v for k, v in plain.items()}
    mixed = {(f"--{k}" if i % 2 else k): v for i, (k, v) in enumerate(plain.items())}
    assert _options(plain)[0] == _options(dashed)[0] == _options(mixed)[0] == EXPECTED["crepa_wan.json"]
    with pytest.raises(ValueError, match=r"`crepa_lambda` is given twice"):
        simpletuner_options({**plain, "--crepa_lambda": 0.3})


def test_string_values_from_the_command_line_are_parsed_and_bad_ones_named():
    options, _ = _options({"model_family": "wan", "crepa_enabled": "true", "crepa_block_index": "4",
                           "crepa_lambda": "0.25", "crepa_normalize_by_frames": "false",
                           "crepa_model": "dinov2_vits14"})
    assert options[0]["block_index"] == 4 and options[0]["lam"] == 0.25 and options[0]["normalize_by_frames"] is False
    with pytest.raises(ValueError, match=r"`crepa_block_index` must be an integer, got '8.5'"):
        simpletuner_options({"model_family": "wan", "crepa_enabled": True, "crepa_block_index": "8.5"})
    with pytest.raises(ValueError, match=r"`crepa_enabled` must be true or false, got 'maybe'"):
        simpletuner_options({"model_family": "wan", "crepa_enabled": "maybe"})


# --- aliases ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias, encoder", [
    ("dino_v2_g", "dinov2_vitg14"), ("dinov2_g", "dinov2_vitg14"), ("dinov2-vitg14", "dinov2_vitg14"),
    ("DINO_V2_S", "dinov2_vits14"), ("dinov2_s", "dinov2_vits14"), ("dinov2-vitb14", "dinov2_vitb14"),
    ("dinov2_vitl14_reg", "dinov2_vitl14_reg"),  # a torch-hub name passes through
])
def test_encoder_aliases(alias, encoder):
    options, _ = _options({"model_family": "flux", "crepa_enabled": True, "crepa_model": alias})
    assert options[0]["encoder"] == encoder


def test_encoder_keys_fall_back_as_in_simpletuner():
    base = {"model_family": "flux", "crepa_enabled": True}
    both, _ = _options({**base, "crepa_encoder": "dinov2_s", "crepa_model": "dinov2_g"})  # crepa_model first
    assert both[0]["encoder"] == "dinov2_vitg14"
    default, messages = _options(base)  # SimpleTuner's defaults: ViT-g/14 at 518 px
    assert (default[0]["encoder"], default[0]["encoder_image_size"]) == ("dinov2_vitg14", 518)
    assert any(m.startswith("`crepa_model`='dinov2_vitg14' (SimpleTuner default)") for m in messages)
    sdxl = {"model_family": "sdxl", "urepa_enabled": True}
    assert _options({**sdxl, "crepa_encoder": "dinov2_s"})[0][0]["encoder"] == "dinov2_vits14"
    assert _options({**sdxl, "crepa_encoder": "dinov2_s", "crepa_model": "dinov2-vitb14"})[0][0]["encoder"] == \
        "dinov2_vitb14"
    assert _options({**sdxl, "crepa_model": "dinov2_s", "urepa_model": "dinov2_g"})[0][0]["encoder"] == "dinov2_vitg14"


@pytest.mark.parametrize("source, teacher", [("encoder", "encoder"), ("external", "encoder"), ("backbone", "backbone"),
                                             ("internal", "backbone"), ("legacy", "backbone")])
def test_feature_source_aliases_and_the_legacy_flag(source, teacher):
    config = {"model_family": "sd3", "crepa_enabled": True, "crepa_block_index": 0, "crepa_teacher_block_index": 2,
              "crepa_encoder_image_size": 224}
    config.update({"crepa_use_backbone_features": True} if source == "legacy" else {"crepa_feature_source": source})
    options, messages = _options(config)
    assert options[0].get("teacher", "encoder") == teacher
    if teacher == "backbone":  # no encoder options; the encoder-only key is dropped with a warning
        assert options[0]["teacher_block_index"] == 2 and "encoder" not in options[0]
        assert "encoder_image_size" not in options[0] and "crepa_encoder_image_size" in _keys(messages)
    else:  # the teacher block is only read with a backbone teacher
        assert "teacher_block_index" not in options[0] and "crepa_teacher_block_index" in _keys(messages)
    RepaCallback(**options[0])


@pytest.mark.parametrize("simpletuner, ours", sorted(FAMILY_NAMES.items()))
def test_every_simpletuner_family_maps_to_a_family_of_ours(simpletuner, ours):
    assert ours in FAMILIES
    method = {"urepa": "urepa_enabled"}.get(FAMILIES[ours].method.value, "crepa_enabled")
    options, _ = _options({"model_family": simpletuner, method: True})
    assert options[0]["family"] == ours


def test_named_families_flavours_and_the_family_override():
    pairs = {"pixart_sigma": "pixart", "sd1x": "sd15", "sd2x": "sd15", "qwen_image": "qwenimage", "ltxvideo2": "ltx2",
             "kandinsky5-video": "kandinsky5_video", "hunyuanvideo": "hunyuan_video15"}
    assert {k: FAMILY_NAMES[k] for k in pairs} == pairs
    kontext, _ = _options({"model_family": "flux", "model_flavour": "kontext", "crepa_enabled": True})
    legacy, _ = _options({"model_family": "legacy", "model_flavour": "2.1", "urepa_enabled": True})
    assert (kontext[0]["family"], legacy[0]["family"]) == ("flux", "sd15")
    overridden, _ = _options({"model_family": "flux", "crepa_enabled": True}, family="chroma")
    assert overridden[0]["family"] == "chroma"
    with pytest.warns(UserWarning, match=r"SimpleTuner default"):
        imported = from_simpletuner({"model_family": "deepfloyd", "crepa_enabled": True}, family="sd3")
    assert imported[0].config.family == "sd3"
    with pytest.raises(ValueError, match=r"model_family='deepfloyd' has no family here \(known: flux, flux2, .*"
                                         r"hunyuanvideo\); for another diffusers denoiser pass family="):
        simpletuner_options({"model_family": "deepfloyd", "crepa_enabled": True})
    with pytest.raises(ValueError, match=r"model_family='fluxx' has no family here; did you mean 'flux'\?"):
        simpletuner_options({"model_family": "fluxx", "crepa_enabled": True})
    with pytest.raises(ValueError, match=r"no `model_family`: pass family="):
        simpletuner_options({"crepa_enabled": True})


# --- deliberate differences and their warnings ---------------------------------------------------------------


def test_manifold_weight_zero_stays_zero_and_warns():
    options, messages = _options({"model_family": "sdxl", "urepa_enabled": True, "urepa_manifold_weight": 0})
    assert options[0]["manifold_weight"] == 0
    assert [m for m in messages if m.startswith("`urepa_manifold_weight=0` stays 0")] and len(messages) == 2  # + CLS
    assert RepaCallback(**options[0]).config.manifold_weight == 0


def test_layersync_lambda_zero_stays_zero_and_warns():
    options, messages = _options({"model_family": "sd3", "layersync_enabled": True, "layersync_student_block": 1,
                                  "layersync_teacher_block": 3, "layersync_lambda": 0})
    assert options[0]["lam"] == 0 and messages == [messages[0]] and messages[0].startswith("`layersync_lambda=0`")
    assert RepaCallback(**options[0]).config.lam == 0


def test_the_teacher_is_patch_tokens_not_cls_and_that_warns_once_naming_the_key():
    options, messages = _options({"model_family": "wan", "crepa_enabled": True, "crepa_encoder": "dinov2_s",
                                  "layersync_enabled": True, "layersync_student_block": 1,
                                  "layersync_teacher_block": 3})
    cls = [m for m in messages if CLS in m]
    assert len(cls) == 1 and cls[0].startswith("`crepa_encoder`='dinov2_vits14'") and "CLS token" in cls[0]


def test_decay_steps_zero_decays_until_max_steps_and_warns():
    options, messages = _options({"model_family": "flux", "crepa_enabled": True, "crepa_scheduler": "cosine",
                                  "crepa_warmup_steps": 100, "crepa_lambda": 0.5, "crepa_lambda_end": 0.1})
    decay = [m for m in messages if m.startswith("`crepa_decay_steps=0`")]
    assert len(decay) == 1 and "max_steps" in decay[0]
    o = options[0]
    w = WeightSchedule(o["schedule"], o["lam"], o["warmup_steps"], o.get("decay_steps", 0), o["lambda_end"],
                       max_steps=1100)
    assert w(100) == pytest.approx(0.5) and w(600) == pytest.approx(0.3) and w(1100) == pytest.approx(0.1)


def test_decay_after_warmup_is_counted_after_warmup_and_warns():
    options, messages = _options(DATA / "repa_flux.json")
    o = options[0]
    w = WeightSchedule(o["schedule"], o["lam"], o["warmup_steps"], o["decay_steps"], o["lambda_end"])
    assert w(5000) > 0.0 and w(5100) == pytest.approx(0.0)  # SimpleTuner's code: 0 from step 5000 on
    note = [m for m in messages if m.startswith("`crepa_decay_steps=5000`")]
    assert len(note) == 1 and "ends at step 5100" in note[0] and "decay_steps=4900" in note[0]


@pytest.mark.parametrize("key, value, what", [("crepa_scheduler", "exponential", "scheduler"),
                                              ("crepa_threshold_mode", "sometimes", "threshold mode"),
                                              ("urepa_scheduler", "step", "scheduler")])
def test_unknown_scheduler_or_threshold_mode_is_an_error(key, value, what):
    family, method = ("sdxl", "urepa_enabled") if key.startswith("urepa") else ("flux", "crepa_enabled")
    with pytest.raises(ValueError, match=rf"`{key}`='{value}' is not a known {what} .* falls back to"):
        simpletuner_options({"model_family": family, method: True, key: value})


def test_unknown_prefixed_keys_are_named_and_others_ignored():
    options, messages = _options({"model_family": "flux", "crepa_enabled": True, "crepa_lamda": 0.3,
                                  "layersync_every_n_steps": 4, "learning_rate": 1e-4, "lr_scheduler": "cosine",
                                  "crepa_model": "dinov2_s"})
    unknown = sorted(m for m in messages if m.startswith("unknown"))
    assert len(unknown) == 2
    assert unknown[0] == "unknown SimpleTuner key `crepa_lamda`=0.3 is not imported; did you mean `crepa_lambda`?"
    assert unknown[1].startswith("unknown SimpleTuner key `layersync_every_n_steps`=4 is not imported")
    assert options == [dict(family="flux", encoder="dinov2_vits14", encoder_image_size=518)]


def test_video_only_keys_on_an_image_family_are_dropped_with_a_warning_unless_default():
    options, messages = _options({"model_family": "flux", "crepa_enabled": True, "crepa_adjacent_distance": 2,
                                  "crepa_adjacent_tau": 1.0, "crepa_model": "dinov2_s"})
    assert "distance" not in options[0] and "tau" not in options[0]
    assert _keys(messages) == {"crepa_adjacent_distance", "crepa_model"}
    video, _ = _options({"model_family": "sanavideo", "crepa_enabled": True, "crepa_adjacent_distance": 2})
    assert video[0]["distance"] == 2


def test_irepa_upgrades_the_method_it_applies_to():
    sdxl, _ = _options({"model_family": "sdxl", "urepa_enabled": True, "irepa_enabled": True,
                        "irepa_projector_kernel_size": 5})
    assert sdxl[0]["irepa"] is True and sdxl[0]["irepa_kernel_size"] == 5 and "irepa_alpha" not in sdxl[0]
    assert RepaCallback(**sdxl[0]).config.projector.value == "conv"
    off, messages = _options({"model_family": "flux", "crepa_enabled": True, "irepa_spatial_norm_alpha": 1.0})
    assert "irepa" not in off[0] and "irepa_alpha" not in off[0]
    assert any(m.startswith("`irepa_spatial_norm_alpha` is only read with irepa_enabled=true") for m in messages)


# --- LayerSync and overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize("student, teacher, blocks", [(8, 16, (7, 15)), (1, 3, (0, 2)), (0, 2, (0, 1)),
                                                      (0, 1, None), (4, 4, None), (5, 3, None)])
def test_layersync_blocks_resolve_as_simpletuner_does(student, teacher, blocks):
    config = {"model_family": "flux", "layersync_enabled": True, "layersync_student_block": student,
              "layersync_teacher_block": teacher}
    if blocks is None:  # 0 and 1 both name block 0 (1-based first): the same block, a no-op
        with pytest.raises(ValueError, match=rf"`layersync_teacher_block`={teacher} \(block \d+\) must be deeper"):
            simpletuner_options(config)
        return
    options, _ = _options(config)
    assert (options[0]["block_index"], options[0]["teacher_block_index"]) == blocks


def test_encoder_overrides_skip_the_layersync_callback_only_when_an_encoder_callback_exists(repa_options):
    both = [dict(family="wan", encoder="dinov2_vitg14"), dict(family="wan", teacher="backbone", teacher_block_index=2)]
    merged = with_overrides(both, {**repa_options, "lam": 0.1})
    assert merged[0]["encoder_checkpoint"] == repa_options["encoder_checkpoint"] and merged[0]["lam"] == 0.1
    assert "encoder_checkpoint" not in merged[1] and "decoder" not in merged[1] and merged[1]["lam"] == 0.1
    alone = with_overrides(both[1:], {"decoder": "pixels"})
    assert alone[0]["decoder"] == "pixels"


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ({"model_family": "flux", "crepa_enabled": True, "crepa_feature_source": "self_flow"},
     r"`crepa_feature_source=self_flow` .* is not supported yet"),
    ({"model_family": "flux", "crepa_enabled": True, "crepa_self_flow": True},
     r"`crepa_self_flow=true` .* not supported"),
    ({"model_family": "flux", "crepa_enabled": True, "crepa_model": "qwen2.5-vl-7b"},
     r"`crepa_model`='qwen2.5-vl-7b': Qwen-VL teachers are not supported yet"),
    ({"model_family": "sdxl", "urepa_enabled": True, "urepa_model": "Qwen/Qwen2.5-VL-3B"}, r"`urepa_model`=.*Qwen-VL"),
    ({"model_family": "flux", "crepa_enabled": True, "crepa_feature_source": "pixels"},
     r"`crepa_feature_source`='pixels' is not one of encoder, external, backbone, internal"),
    ({"model_family": "flux", "crepa_enabled": True, "crepa_use_backbone_features": True,
      "crepa_feature_source": "encoder"}, r"`crepa_use_backbone_features=true` contradicts"),
    ({"model_family": "flux", "crepa_enabled": True, "crepa_feature_source": "backbone"},
     r"needs `crepa_teacher_block_index`.* a no-op"),
    ({"model_family": "flux", "layersync_enabled": True, "layersync_student_block": 8},
     r"`layersync_teacher_block` is unset: .* a no-op"),
    ({"model_family": "flux", "layersync_enabled": True}, r"needs `layersync_student_block`"),
    ({"model_family": "flux", "urepa_enabled": True}, r"`urepa_enabled` is U-REPA for UNets .* 'flux' is a DiT: use "
                                                      r"crepa_enabled"),
    ({"model_family": "wan", "urepa_enabled": True}, r"'wan' is a video DiT"),
    ({"model_family": "sdxl", "crepa_enabled": True}, r"'sdxl' is a UNet: use urepa_enabled"),
    ({"model_family": "kolors", "layersync_enabled": True, "layersync_student_block": 1, "layersync_teacher_block": 2},
     r"LayerSync aligns two transformer blocks, but family 'kolors' is a UNet"),
    ({"model_family": "flux", "irepa_enabled": True}, r"`irepa_enabled` upgrades crepa_enabled"),
    ({"model_family": "flux", "crepa_enabled": False, "learning_rate": 1e-4}, r"enables no alignment method"),
])
def test_refusals_name_the_setting(config, message):
    with pytest.raises(ValueError, match=message):
        simpletuner_options(config)


def test_use_tae_needs_a_checkpoint_and_files_are_checked(tmp_path, monkeypatch):
    config = {"model_family": "flux", "crepa_enabled": True, "crepa_use_tae": True}
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"`crepa_use_tae` / `urepa_use_tae` = true "
                                                                   r"maps to decoder='tae'"):
        from_simpletuner(config)
    with pytest.warns(UserWarning, match=r"SimpleTuner default"):
        assert from_simpletuner(config, tae_checkpoint="taef1.pth")[0].config.decoder.value == "tae"
    with pytest.raises(FileNotFoundError, match=r"SimpleTuner config '.*missing.json' not found"):
        simpletuner_options(tmp_path / "missing.json")
    (tmp_path / "config.env").write_text("X=1")
    with pytest.raises(ValueError, match=r"expected a .json or .toml file"):
        simpletuner_options(tmp_path / "config.env")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    with pytest.raises(RuntimeError, match=r"config.toml needs Python 3.11 or later \(tomllib\)"):
        simpletuner_options(DATA / "config.toml")


# --- 2-step fits from imported configs ------------------------------------------------------------------------


class _Seen(L.Callback):
    """What one RepaCallback did, through its public seams: each micro-batch's `last_result`, and the
    tokens its alignment step was handed (`step.listeners`)."""

    def __init__(self, repa: RepaCallback) -> None:
        self.repa, self.results, self.inputs = repa, [], []
        repa.step.listeners.append(self.inputs.append)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.results.append(self.repa.last_result)


def _fit(module, data, callbacks):
    seen = [_Seen(cb) for cb in callbacks]
    trainer(2, [*callbacks, *seen]).fit(module, data)
    assert all(len(s.results) == 2 and [r.step for r in s.results] == [0, 1] for s in seen)
    return seen


def test_flux_repa_from_its_config_trains(repa_options):
    config = {**json.loads((DATA / "repa_flux.json").read_text()), "--crepa_block_index": 1}  # tiny flux: 4 blocks
    (repa,), messages = _import(config, **repa_options)
    assert _keys(messages) == {"crepa_model", "crepa_decay_steps"}
    with pytest.warns(UserWarning, match="warmup_steps=100 is not shorter than the run"):
        (record,) = _fit(TinyFlow("flux"), loader("flux"), [repa])
    last = record.results[-1]  # step 1 of a cosine schedule with a 100-step warm-up: 0.5 * 1 / 100
    assert last.step == 1 and last.weight == pytest.approx(0.005) and -1 <= float(last.similarity) <= 1
    assert float(last.loss) == pytest.approx(-0.005 * float(last.similarity), rel=1e-5)


def test_sdxl_urepa_from_its_config_trains(repa_options):
    (repa,), messages = _import(DATA / "urepa_sdxl.json", **repa_options)
    assert _keys(messages) == {"urepa_model"}
    (record,) = _fit(TinyFlow("sdxl"), loader("sdxl"), [repa])
    for result in record.results:  # cosine from 0.5 to 0 over 1000 steps, manifold weight 3
        w = 0.5 * (1 + math.cos(math.pi * result.step / 1000)) / 2
        want = w * (-float(result.similarity) + 3.0 * float(result.terms["manifold"]))
        assert result.weight == pytest.approx(w) and float(result.loss) == pytest.approx(want, rel=1e-5)


def test_wan_crepa_from_its_config_trains(repa_options):
    config = {**json.loads((DATA / "crepa_wan.json").read_text()), "crepa_block_index": 1}  # tiny wan: 3 blocks
    (crepa,), messages = _import(config, **repa_options)
    assert _keys(messages) == {"crepa_encoder", "crepa_similarity_threshold"}
    (seen,) = _fit(TinyVideoFlow("wan"), video_loader("wan"), [crepa])
    for result in seen.results:  # constant 0.5; the loss is -0.5 x the neighbour-weighted score
        assert result.weight == 0.5 and float(result.loss) == pytest.approx(-0.5 * float(result.terms["score"]),
                                                                              rel=1e-5)
    student = seen.inputs[-1].student  # (B, T', N, D): 3 latent frames of 2x4 tokens
    assert student.shape[:3] == (2, 3, 8)
    assert (crepa.config.distance, crepa.config.tau, crepa.config.similarity_threshold) == (1, 1.0, 0.9)


def test_wan_layersync_beside_crepa_from_one_config_trains(repa_options):
    """SimpleTuner runs CREPA and LayerSync side by side; the encoder overrides skip the LayerSync callback."""
    config = {**json.loads((DATA / "crepa_wan.json").read_text()), "crepa_block_index": 1,
              "layersync_enabled": True, "layersync_student_block": 1, "layersync_teacher_block": 3}
    (crepa, layersync), _ = _import(config, **repa_options)
    assert (layersync.block_index, layersync.config.teacher_block_index, layersync.config.distance) == (0, 2, 0)
    records = _fit(TinyVideoFlow("wan"), video_loader("wan"), [crepa, layersync])
    inputs = records[1].inputs[-1]  # LayerSync: -0.2 x the cosine of every token with its deeper self
    student, deeper = inputs.student.detach(), getattr(inputs.teacher, "tokens", inputs.teacher)
    assert student.shape == deeper.shape and student.shape[:2] == (2, 3)  # (B, T', N, D): 3 latent frames
    want = torch.nn.functional.cosine_similarity(student, deeper, dim=-1).mean()
    assert float(records[1].results[-1].similarity) == pytest.approx(float(want), abs=1e-5)
    assert float(records[1].results[-1].loss) == pytest.approx(-0.2 * float(want), abs=1e-5)
