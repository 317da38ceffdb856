"""CREPA on the video DiT families (wan, ltxvideo, sanavideo, kandinsky5_video): per-frame capture
on the real diffusers classes, the real video VAEs' frame correspondence, the backbone teacher
per frame, and the errors (SPEC sections 3, 5 and 6.3)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from helpers import Recorder, TinyVideoFlow, VideoData, trainer, video_loader
from lightning_repa import RepaCallback
from lightning_repa.maths.align import teacher_frames
from lightning_repa.testing.tiny_video_models import TINY_VIDEO_FAMILIES, normalize_latents, tiny_video_vae

VIDEO = ("wan", "ltxvideo", "sanavideo", "kandinsky5_video")  # hunyuan_video15, ltx2: tests/test_frontier_families.py
BLOCK_LISTS = {"wan": "blocks", "ltxvideo": "transformer_blocks", "sanavideo": "transformer_blocks",
               "kandinsky5_video": "visual_transformer_blocks"}
PATCH = {"wan": (1, 2, 2), "ltxvideo": (1, 1, 1), "sanavideo": (1, 2, 2), "kandinsky5_video": (1, 2, 2)}


class _BlockOutput(L.Callback):
    """Block 1's output by an independent hook (forwards with gradients), and the first step's gradients."""

    def __init__(self, attr: str) -> None:
        self.attr, self.outputs, self.grads = attr, [], {}

    def on_fit_start(self, trainer, pl_module):
        getattr(pl_module.transformer, self.attr)[1].register_forward_hook(
            lambda m, a, out: self.outputs.append(out.detach().clone()) if torch.is_grad_enabled() else None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.clone() for n, p in pl_module.transformer.named_parameters() if p.grad is not None}


def _fit(family, steps, callbacks, data=None, lr=1e-2):
    module = TinyVideoFlow(family, lr=lr)
    L.seed_everything(0)
    trainer(steps, callbacks).fit(module, data or video_loader(family))
    return module


@pytest.mark.parametrize("family", VIDEO)
def test_video_family_trains_with_crepa_on_per_frame_tokens(family, repa_options):
    """3 steps, 3 latent frames of 4x8 (non-square): the projector is fed block 1's output split per
    frame, (B, T', H'W', D); projector and denoiser get gradients, the denoiser's differ without CREPA."""
    repa = RepaCallback(family=family, block_index=1, lam=1.0, **repa_options)
    record, ref = Recorder(repa), _BlockOutput(BLOCK_LISTS[family])
    module = _fit(family, 3, [repa, record, ref])
    pt, ph, pw = PATCH[family]
    t, h, w = 3 // pt, 4 // ph, 8 // pw
    assert len(record.inputs) == len(ref.outputs) == 3
    for inputs, out in zip(record.inputs, ref.outputs):  # out: (B, T'*H'*W', D), frame-major, row-major
        want = torch.stack([torch.stack([out[:, f * h * w + i * w + j] for i in range(h) for j in range(w)], 1)
                            for f in range(t)], 1)  # (B, T', H'*W', D)
        assert inputs["grid_s"] == (h, w) and inputs["teacher"].shape[:2] == (2, t)
        torch.testing.assert_close(inputs["student"].detach(), want, rtol=0, atol=0)
    assert all(not torch.equal(v, record.initial[k]) for k, v in module.repa_projector.state_dict().items())
    plain = _BlockOutput(BLOCK_LISTS[family])
    _fit(family, 1, [plain])
    first = [n for n in plain.grads if n.startswith(BLOCK_LISTS[family] + ".0.")]
    assert first and any(not torch.allclose(ref.grads[n], plain.grads[n]) for n in first)
    logged = record.steps[-1]["logged"]
    assert {"repa/score", "repa/similarity", "repa/loss"} <= set(logged)
    assert -1 <= logged["repa/similarity"] <= 1


class _WithVideoVAE(TinyVideoFlow):
    """The family's real (tiny) video VAE at `self.vae`; batches of clean latents encoded from frames."""

    def __init__(self, family: str) -> None:
        super().__init__(family)
        self.vae = tiny_video_vae(family).eval().requires_grad_(False)


class _EncodedClips(torch.utils.data.Dataset):
    def __init__(self, vae, frames: int, n: int = 2) -> None:
        g = torch.Generator().manual_seed(0)
        self.frames = torch.rand(n, 3, frames, 16, 32, generator=g)  # (N, 3, F, H, W) in [0, 1]
        with torch.no_grad():
            z = vae.encode(self.frames * 2 - 1).latent_dist.mode()
            self.latents = normalize_latents(vae, z)  # training space, (N, C, T, h, w)

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        return {"latents": self.latents[i], "ids": i}


@pytest.mark.parametrize("family, pixel_frames, picked", [("wan", 9, [0, 4, 8]), ("ltxvideo", 17, [0, 8, 16])])
def test_real_video_vae_frames_map_to_latent_frames(family, pixel_frames, picked, repa_options):
    """decoder=vae: the clean latents are decoded by the family's real VAE class to 1 + (T-1) r frames
    (r = 4 for Wan, 8 for LTX), and latent frame t is aligned with pixel frame t * r."""
    module = _WithVideoVAE(family)
    data = _EncodedClips(module.vae, pixel_frames)
    assert data.latents.shape[2] == 3
    repa = RepaCallback(family=family, block_index=1, **{**repa_options, "decoder": "vae"})
    record = Recorder(repa)
    trainer(1, [repa, record]).fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert teacher_frames(3, pixel_frames, picked[1]) == picked and record.inputs[0]["frames_per_latent"] == picked[1]
    decoded = repa.teacher.images({}, data.latents)  # (B, F, 3, H, W)
    assert decoded.shape == (2, pixel_frames, 3, 16, 32)
    for t, f in enumerate(picked):
        want = repa.teacher.encoder(decoded[:, f])  # (B, M, D): the encoder on pixel frame f alone
        torch.testing.assert_close(record.inputs[0]["teacher"][:, t], want, rtol=1e-4, atol=1e-5)
    other = repa.teacher.encoder(decoded[:, 1])
    assert not torch.allclose(record.inputs[0]["teacher"][:, 1], other, atol=1e-3)


def test_teacher_frames_rule():
    assert teacher_frames(3, 9, 4) == [0, 4, 8] and teacher_frames(2, 5, 4) == [0, 4]
    assert teacher_frames(4, 4, 4) == [0, 1, 2, 3] and teacher_frames(3, 17, 8) == [0, 8, 16]
    with pytest.raises(ValueError, match=r"8 pixel frames are too few for 3 latent frames"):
        teacher_frames(3, 8, 4)


def test_backbone_teacher_on_video_is_detached_and_per_frame():
    repa = RepaCallback(family="wan", block_index=0, teacher="backbone", teacher_block_index=2, lam=1.0)
    record = Recorder(repa)
    _fit("wan", 1, [repa, record])
    student, teacher = record.inputs[0]["student"], record.inputs[0]["teacher"]
    assert student.shape == teacher.shape == (2, 3, 8, 32) and record.inputs[0]["grid_t"] == (2, 4)
    assert student.requires_grad and not teacher.requires_grad
    assert not torch.allclose(student.detach(), teacher)


@pytest.mark.parametrize("options", [dict(spatial_align=False), dict(irepa=True)])
def test_pooled_and_irepa_variants_train_on_video(options, repa_options):
    repa = RepaCallback(family="sanavideo", block_index=1, **options, **repa_options)
    record = Recorder(repa)
    module = _fit("sanavideo", 2, [repa, record])
    assert all(not torch.equal(v, record.initial[k]) for k, v in module.repa_projector.state_dict().items())
    assert torch.isfinite(torch.tensor(record.steps[-1]["logged"]["repa/loss"]))


def test_distance_in_pixel_frames_uses_the_vae_compression(repa_options):
    module = _WithVideoVAE("wan")
    data = _EncodedClips(module.vae, 9)
    repa = RepaCallback(family="wan", block_index=1, distance=4, distance_unit="pixel",
                        **{**repa_options, "decoder": "vae", "drop_vae_encoder": True})
    record = Recorder(repa)
    trainer(1, [repa, record]).fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    ratio = record.inputs[0]["frames_per_latent"]
    assert ratio == 4 and repa.objective.latent_distance(ratio) == 1
    assert module.vae.encoder is None  # drop_vae_encoder freed the video VAE's encoder; decoding still works
    with pytest.raises(ValueError, match=r"teacher=backbone sees no pixel frames"):
        RepaCallback(family="wan", teacher="backbone", teacher_block_index=9, distance_unit="pixel")


def test_video_errors_name_the_fix(repa_options):
    with pytest.raises(ValueError, match=r"method='repa' does not fit family='wan'; use method='crepa'"):
        RepaCallback(family="wan", method="repa")
    with pytest.raises(ValueError, match=r"expects spatial latents \(B, C, T, h, w\)"):
        trainer(1, [RepaCallback(family="wan", block_index=1, **repa_options)]).fit(
            TinyVideoFlow("wan"), torch.utils.data.DataLoader(
                [{"latents": torch.randn(4, 4, 8), "pixels": torch.rand(3, 32, 64), "ids": 0}] * 2, batch_size=2))
    with pytest.raises(ValueError, match=r"2 pixel frames are too few for 3 latent frames"):
        trainer(1, [RepaCallback(family="wan", block_index=1, **repa_options)]).fit(
            TinyVideoFlow("wan"), video_loader("wan", frames_hw=(2, 32, 64)))


def test_kandinsky_fractal_order_is_refused():
    """Kandinsky 5's nabla attention (sparse_params["to_fractal"]) tiles each frame's tokens 8x8: the
    family's selector refuses it, with the fix, instead of misreading the frames."""
    from lightning_repa.models.families import FAMILIES

    select = FAMILIES["kandinsky5_video"].blocks[0].select
    x = torch.randn(1, 3 * 8 * 8, 4)
    assert select(x, x.shape[1], {"sparse_params": None}) is x
    with pytest.raises(ValueError, match=r"sparse_params\['to_fractal'\].*train with the regular attention"):
        select(x, x.shape[1], {"sparse_params": {"to_fractal": True}})


def test_data_shapes():
    item = VideoData("wan")[0]  # 3 latent frames: the 1 + 2 * 4 pixel frames Wan's VAE encodes into them
    assert item["latents"].shape == (4, 3, 4, 8) and item["pixels"].shape == (9, 3, 32, 64)
    assert VideoData("ltxvideo")[0]["pixels"].shape == (17, 3, 32, 64)


@pytest.mark.parametrize("family", VIDEO)
def test_video_latents_are_denormalised_as_each_pipeline_does(family):
    """decoders' training-space -> VAE-space transform equals the pipelines' (tiny_video_models
    writes each pipeline's formula out, with its file and line)."""
    from lightning_repa.teachers.decoders import to_raw_latents
    from lightning_repa.testing.tiny_video_models import denormalize_latents

    vae = tiny_video_vae(family)
    z = torch.randn(2, TINY_VIDEO_FAMILIES[family].latent_channels, 3, 2, 4)
    want = denormalize_latents(vae, z)
    torch.testing.assert_close(to_raw_latents(z, "kl", vae), want)
    assert not torch.allclose(want, z)  # the transform is not the identity for any of them


def test_demo_video_experiment_runs_at_a_tiny_size(tmp_path):
    """`experiment=demo_video`: CREPA on the digit clips with a tiny Wan DiT towards the shipped teacher."""
    from hydra import compose, initialize_config_module

    from lightning_repa.apps.train import run

    overrides = ["experiment=demo_video", "trainer.max_steps=2", "repa.warmup_steps=1", "data.batch_size=4",
                 "checkpoint.every_n_train_steps=2",
                 "trainer.log_every_n_steps=1", "sample.per_class=1", "sample.steps=2", "logger=csv",
                 f"paths.output_dir={tmp_path}"]
    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        cfg = compose(config_name="config", overrides=overrides)
    assert cfg.repa.family == "wan" and cfg.repa.method.value == "crepa"
    result = run(cfg)
    assert result["global_step"] == 2 and result["samples"].is_file()
    for key in ("repa/similarity", "repa/score", "repa/loss", "train/loss"):
        assert key in result["metrics"], key
