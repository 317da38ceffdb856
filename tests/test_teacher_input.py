"""What reaches the teacher is what the user meant (issue 19, items 1 and 5, and channel-first clips):
pixels in another range or dtype are converted by a documented rule or refused before the first
optimizer step; CREPA's pixel frames follow the VAE's temporal compression, never the frame counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import Recorder, TinyFlow, TinyVideoFlow, loader, trainer, video_loader
from lightning_repa import RepaCallback
from lightning_repa.encoders import load_encoder
from lightning_repa.maths.align import teacher_frames


class _Transformed(torch.utils.data.Dataset):
    """The tiny latent data with its pixels changed by `fn` (e.g. to uint8 or to [-1, 1])."""

    def __init__(self, base, fn) -> None:
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        item["pixels"] = self.fn(item["pixels"])
        return item


def _teacher_tokens(data, repa_options, **options) -> torch.Tensor:
    repa = RepaCallback(family="sd3", block_index=1, **{**repa_options, **options})
    record = Recorder(repa)
    trainer(1, [repa, record]).fit(TinyFlow("sd3"), DataLoader(data, batch_size=2))
    return record.inputs[0]["teacher"]


def test_uint8_pixels_are_read_as_0_to_255(repa_options):
    """What `torchvision.io.read_image` returns: uint8 is divided by 255 (the rule torchvision's
    `to_dtype(scale=True)` uses), so the teacher sees the image, not a white page."""
    base = loader("sd3", n=2).dataset
    as_uint8 = _Transformed(base, lambda p: (p * 255).round().to(torch.uint8))
    encoder = load_encoder("dinov2_vits14", image_size=56, checkpoint=repa_options["encoder_checkpoint"])
    pixels = torch.stack([as_uint8[i]["pixels"] for i in range(2)]).float() / 255
    with torch.no_grad():
        want = encoder(pixels)
    torch.testing.assert_close(_teacher_tokens(as_uint8, repa_options), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn, declared, fix", [
    (lambda p: 2 * p - 1, [0.0, 1.0], r"here: pixels_range=\[-1, 1\]"),  # [-1, 1] images under the default range
    (lambda p: 255 * p, [0.0, 1.0], r"here: pixels / 255"),             # 0..255 floats
    (lambda p: 255 * p, [-1.0, 1.0], r"here: pixels / 255"),
])
def test_float_pixels_outside_the_range_are_refused_before_the_first_optimizer_step(fn, declared, fix, repa_options):
    data = _Transformed(loader("sd3", n=4).dataset, fn)
    repa = RepaCallback(family="sd3", block_index=1, warmup_steps=2, pixels_range=declared, **repa_options)
    module = TinyFlow("sd3")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit = trainer(3, [repa])
    with pytest.raises(ValueError, match=rf"`pixels_range`=\[.*holds pixels in \[.*{fix}"):
        fit.fit(module, DataLoader(data, batch_size=2))
    assert fit.global_step == 0  # step 0 has weight 0 (warm-up) and is still checked
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_pixels_inside_the_range_pass_and_other_integers_are_refused(repa_options):
    data = _Transformed(loader("sd3", n=2).dataset, lambda p: 2 * p - 1)
    assert _teacher_tokens(data, repa_options, pixels_range=[-1.0, 1.0]).isfinite().all()
    as_int16 = _Transformed(loader("sd3", n=2).dataset, lambda p: (p * 1000).to(torch.int16))
    with pytest.raises(TypeError, match=r"int16.*uint8.*float"):
        _teacher_tokens(as_int16, repa_options)


# ----------------------------------------------------------------------------- video frames


@pytest.mark.parametrize("latent_frames, pixel_frames, ratio, picked", [
    (2, 8, 4, [0, 4]),       # Wan: frames 1-4 make latent 1, frame 7 is dropped by the encoder
    (3, 11, 4, [0, 4, 8]),   # 11 = 1 + 2*4 + 2: the two tail frames are dropped
    (2, 12, 8, [0, 8]),      # LTX-Video: 12 = 1 + 8 + 3
    (3, 9, 4, [0, 4, 8]),
    (3, 3, 4, [0, 1, 2]),    # one pixel frame per latent frame
    (1, 1, 4, [0]),
])
def test_teacher_frames_follow_the_vae_compression(latent_frames, pixel_frames, ratio, picked):
    assert teacher_frames(latent_frames, pixel_frames, ratio) == picked


def test_too_few_pixel_frames_are_refused():
    with pytest.raises(ValueError, match=r"5 pixel frames.*3 latent frames.*at least 9"):
        teacher_frames(3, 5, 4)


class _Clips(torch.utils.data.Dataset):
    def __init__(self, family: str, frames: int, latent_frames: int = 2, n: int = 2) -> None:
        base = video_loader(family, n=n, thw=(latent_frames, 4, 8)).dataset
        g = torch.Generator().manual_seed(5)
        self.items = [{**base[i], "pixels": torch.rand(frames, 3, 32, 64, generator=g)} for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("family, frames, picked", [("wan", 8, [0, 4]), ("ltxvideo", 12, [0, 8])])
def test_crepa_aligns_the_pixel_frames_the_vae_puts_in_each_latent(family, frames, picked, repa_options):
    data = _Clips(family, frames)
    repa = RepaCallback(family=family, block_index=1, **repa_options)
    record = Recorder(repa)
    trainer(1, [repa, record]).fit(TinyVideoFlow(family), DataLoader(data, batch_size=2))
    encoder = load_encoder("dinov2_vits14", image_size=56, checkpoint=repa_options["encoder_checkpoint"])
    pixels = torch.stack([data[i]["pixels"] for i in range(2)])  # (B, F, 3, H, W)
    with torch.no_grad():
        for t, f in enumerate(picked):
            torch.testing.assert_close(record.inputs[0]["teacher"][:, t], encoder(pixels[:, f]), rtol=1e-4, atol=1e-4)
    assert record.inputs[0]["frames_per_latent"] == picked[1]


def test_the_compression_comes_from_the_attached_vae_or_the_option(repa_options):
    """A Wan VAE of another temporal compression (2: one downsampling time step) decides; without a VAE,
    `frames_per_latent` does."""
    from diffusers import AutoencoderKLWan

    class WithVAE(TinyVideoFlow):
        def __init__(self) -> None:
            super().__init__("wan")
            self.vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                        temperal_downsample=[False, True, False]).requires_grad_(False)

    data = _Clips("wan", 5, latent_frames=3)  # 5 = 1 + 2*2
    repa = RepaCallback(family="wan", block_index=1, **repa_options)
    record = Recorder(repa)
    trainer(1, [repa, record]).fit(WithVAE(), DataLoader(data, batch_size=2))
    assert record.inputs[0]["frames_per_latent"] == 2
    repa = RepaCallback(family="wan", block_index=1, frames_per_latent=2, **repa_options)
    record = Recorder(repa)
    trainer(1, [repa, record]).fit(TinyVideoFlow("wan"), DataLoader(data, batch_size=2))
    assert record.inputs[0]["frames_per_latent"] == 2
    with pytest.raises(ValueError, match=r"5 pixel frames.*3 latent frames.*at least 9"):
        trainer(1, [RepaCallback(family="wan", block_index=1, **repa_options)]).fit(
            TinyVideoFlow("wan"), DataLoader(data, batch_size=2))


def test_channel_first_clips_are_refused(repa_options):
    """Clips are read (B, F, 3, H, W), frames first; (B, 3, F, H, W) is refused, and so is a 3-frame
    clip, whose two layouts have the same shape."""
    for frames in (5, 3):
        clips = _Clips("wan", frames, latent_frames=frames)
        for item in clips.items:
            item["pixels"] = item["pixels"].transpose(0, 1)  # (3, F, H, W)
        with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\).*permute\(0, 2, 1, 3, 4\)"):
            trainer(1, [RepaCallback(family="wan", block_index=1, **repa_options)]).fit(
                TinyVideoFlow("wan"), DataLoader(clips, batch_size=2))
