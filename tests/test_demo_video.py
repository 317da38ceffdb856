"""The CREPA demo's parts: the moving-digit clips, the Wan video DiT trained by rectified flow,
its sample strip, and the experiment's config (composed, not run)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

import lightning_repa.apps.hydra_config  # noqa: F401  (registers the schemas)
from helpers import labelled_grid
from lightning_repa import RepaCallback
from lightning_repa.demo.clips import DigitClipsDataModule, clip_directions, make_clips
from lightning_repa.demo.data import load_digit_images
from lightning_repa.demo.video import FlowMatchingVideo

T, H, W = 5, 16, 24  # the defaults of the data module and the model


@pytest.fixture(scope="module")
def clips() -> DigitClipsDataModule:
    dm = DigitClipsDataModule(batch_size=8)
    dm.setup()
    return dm


def _compose(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        return compose(config_name="config", overrides=list(overrides))


def _centre_x(frames: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted column of each frame (..., H, W) -> (...)."""
    cols = frames.sum(-2)  # (..., W)
    return (cols * torch.arange(frames.shape[-1], dtype=frames.dtype)).sum(-1) / cols.sum(-1)


# --- the clips ------------------------------------------------------------------------------


def test_batches_are_video_latents_and_pixel_frames(clips):
    batch = next(iter(clips.train_dataloader()))
    assert batch["latents"].shape == (8, 1, T, H, W)  # (B, C, T, H, W), non-square frames
    assert batch["pixels"].shape == (8, T, 3, H, W)  # one RGB frame per latent frame
    assert batch["labels"].shape == batch["ids"].shape == (8,)
    assert batch["latents"].min() >= -1.0 and batch["latents"].max() <= 1.0
    assert batch["pixels"].min() >= 0.0 and batch["pixels"].max() <= 1.0
    # the same clip in both: latents are the pixels mapped to [-1, 1]
    torch.testing.assert_close(batch["latents"][:, 0], batch["pixels"][:, :, 0] * 2.0 - 1.0)
    assert len(clips.train_set) + len(clips.val_set) == 1797 and len(clips.val_set) == 180


def test_every_frame_shows_the_whole_digit_moving_speed_pixels_a_frame(clips):
    digits, _ = load_digit_images(16)
    ds = clips.train_set
    dx_seen = set()
    for i in range(0, len(ds), 97):
        frames = ds[i]["pixels"][:, 0]  # (T, H, W)
        digit = digits[int(ds[i]["ids"]), 0]
        for frame in frames:  # the digit fully inside the canvas: nothing lost, nothing added
            torch.testing.assert_close(frame.sum(), digit.sum())
        dx = int(round(float(_centre_x(frames[1]) - _centre_x(frames[0]))))
        assert dx in (-2, 2)
        for k in range(T - 1):  # each frame is the previous one shifted by 2 columns
            torch.testing.assert_close(frames[k + 1], torch.roll(frames[k], dx, dims=-1))
        dx_seen.add(dx)
    assert dx_seen == {-2, 2}  # both directions occur


def test_clips_are_deterministic_and_the_seed_moves_the_shuffle_only(clips):
    other = DigitClipsDataModule(batch_size=8, seed=1)
    other.setup()
    assert torch.equal(other.val_set.ids, clips.val_set.ids)  # the split follows split_seed only
    assert torch.equal(other.train_set.clips, clips.train_set.clips)  # a digit's motion is its own
    first = lambda dm: next(iter(dm.train_dataloader()))["ids"]  # noqa: E731
    assert torch.equal(first(clips), first(clips))
    assert not torch.equal(first(clips), first(other))
    resplit = DigitClipsDataModule(batch_size=8, split_seed=1)
    resplit.setup()
    assert not torch.equal(resplit.val_set.ids, clips.val_set.ids)
    # the clip of a digit does not depend on the split it lands in
    common = sorted(set(resplit.train_set.ids.tolist()) & set(clips.train_set.ids.tolist()))[:20]
    pos = lambda ds, i: int((ds.ids == i).nonzero())  # noqa: E731
    for i in common:
        a, b = resplit.train_set.clips[pos(resplit.train_set, i)], clips.train_set.clips[pos(clips.train_set, i)]
        assert torch.equal(a, b)


def test_directions_follow_the_canvas():
    assert clip_directions(16, 24, 16, 5, 2) == [(0, 1), (0, -1)]  # room to move sideways only
    assert len(clip_directions(24, 24, 16, 5, 2)) == 8  # and vertically, and diagonally
    digits, _ = load_digit_images(16)
    tall = make_clips(digits[:40], torch.arange(40), 3, 24, 20, 3)  # (N, T, 24, 20)
    assert tall.shape == (40, 3, 24, 20)
    rows = tall.sum(-1)  # (N, T, H)
    centre_y = (rows * torch.arange(24.0)).sum(-1) / rows.sum(-1)
    assert (centre_y[:, 1] - centre_y[:, 0]).abs().max() > 2.5  # some digits move vertically


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(speed=3), "cannot move 3 px a frame"),  # 3 * 4 = 12 > 8 spare columns
        (dict(speed=0), "`speed` must be >= 1"),
        (dict(digit_size=20), "does not fit"),
        (dict(batch_size=0), "`batch_size`"),
    ],
)
def test_bad_clip_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitClipsDataModule(**kwargs)


# --- the model ------------------------------------------------------------------------------


def _tiny_model(**kwargs) -> FlowMatchingVideo:
    return FlowMatchingVideo(num_layers=2, num_heads=2, head_dim=16, ffn_dim=32, **kwargs)


def test_the_model_is_a_wan_transformer_and_keeps_the_clip_layout():
    from diffusers import WanTransformer3DModel

    model = _tiny_model()
    assert isinstance(model.transformer, WanTransformer3DModel) and len(model.transformer.blocks) == 2
    x = torch.randn(3, 1, T, H, W)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 10]))  # 10: the null class
    assert out.shape == x.shape
    assert out.abs().max() == 0  # zero-initialised output projection: v = 0 at first
    with pytest.raises(ValueError, match="even"):
        FlowMatchingVideo(height=15)


def test_two_training_steps_without_the_callback(clips):
    L.seed_everything(0)
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=clips)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    val = next(iter(clips.val_dataloader()))  # validation's loss: fixed noise and times
    losses = [model._loss(val, generator=torch.Generator().manual_seed(1000)) for _ in range(2)]
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sample_strip_is_one_row_of_frames_per_clip(tmp_path):
    model = _tiny_model()
    clips = model.sample([1, 2], steps=2, seed=3)
    assert clips.shape == (2, 1, T, H, W) and clips.min() >= 0.0 and clips.max() <= 1.0
    assert torch.equal(clips, model.sample([1, 2], steps=2, seed=3))
    path = model.save_sample_grid(tmp_path / "strip.png", steps=1, per_class=2, scale=3, seed=0)
    # 20 rows of 16-px frames, 5 frames of 24 px side by side, 1-px gaps, upscaled 3x; class and frame labels
    labelled_grid(path, ((T * (W + 1) + 1) * 3, (20 * (H + 1) + 1) * 3), rows=20)
    with Image.open(path) as img:
        top = img.size[1] - 4 - (20 * (H + 1) + 1) * 3
        assert (np.asarray(img)[top - 14: top, -4 - (T * (W + 1) + 1) * 3:] < 100).any(), "frame labels"


# --- the configs ----------------------------------------------------------------------------


def test_plain_background_preset_is_t2v_with_a_step_cutoff():
    t2v, plain = (_compose(f"schedule={s}").repa for s in ("t2v", "t2v_plain"))
    assert plain.cutoff_step == 2000 and t2v.cutoff_step == 0
    keys = ("schedule", "lam", "warmup_steps", "decay_steps", "lambda_end", "similarity_threshold", "threshold_mode")
    for key in keys:
        assert plain[key] == t2v[key], key
    assert RepaCallback.from_config(plain).config.cutoff_step == 2000


def test_demo_video_experiment_composes():
    from hydra.utils import get_class

    cfg = _compose("experiment=demo_video")
    assert cfg.task_name == "demo_video"
    repa = cfg.repa
    assert repa.family == "wan" and repa.method.value == "crepa"
    assert repa.lam == 0.5 and repa.distance == 1
    assert repa.encoder == "vit_tiny_digits_patch2" and repa.decoder.value == "pixels"
    assert repa.schedule.value == "cosine" and repa.warmup_steps == 100 and repa.similarity_threshold == 0.85
    assert 0 <= repa.block_index < cfg.model.num_layers  # the model's block, not wan's default 8
    assert RepaCallback.from_config(repa).block_index == repa.block_index
    assert cfg.trainer.max_steps % cfg.checkpoint.every_n_train_steps == 0  # last.ckpt is the end
    for key in ("num_frames", "height", "width", "seed"):  # Lightning logs both: one value per name
        assert cfg.model[key] == cfg.data[key], key
    assert get_class(cfg.model._target_) is FlowMatchingVideo
    assert get_class(cfg.data._target_) is DigitClipsDataModule
