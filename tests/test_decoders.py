"""Decoding training-space latents: the pipelines' formulas, and real FLUX.2 TAE weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from PIL import Image

from helpers import TinyFlow, loader, trainer
from lightning_repa import RepaCallback
from lightning_repa.config import Decoder
from lightning_repa.teachers.decoders import (
    LatentDecoder,
    flux2_from_raw,
    load_tiny_decoder,
    patchify_2x2,
    to_raw_latents,
    unpatchify_2x2,
)
from lightning_repa.teachers.pixels import pixels_to_unit
from lightning_repa.teachers.taef2 import load_tae


def _tiny_kl(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
        sample_size=32, **{"latent_channels": 4, **config},
    ).eval()


def test_kl_decode_is_the_sd3_flux_pipeline_formula():
    vae = _tiny_kl(scaling_factor=1.5305, shift_factor=0.0609)
    z = torch.randn(2, 4, 8, 12)
    images = LatentDecoder("vae", "kl", vae=vae)(z)
    want = vae.decode(z / 1.5305 + 0.0609).sample  # pipeline_stable_diffusion_3.py / pipeline_flux.py
    torch.testing.assert_close(images, ((want + 1) / 2).clamp(0, 1))
    assert images.shape == (2, 3, 16, 24)
    ignored_shift = ((vae.decode(z / 1.5305).sample + 1) / 2).clamp(0, 1)  # the reference's defect 12.4
    assert not torch.allclose(images, ignored_shift, atol=1e-3)


def test_kl_decode_uses_latents_mean_and_std_when_defined():
    vae = _tiny_kl(scaling_factor=0.5, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.0, 2.0, 0.5, 1.5])
    z = torch.randn(1, 4, 6, 6)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
    std = torch.tensor([1.0, 2.0, 0.5, 1.5]).view(1, 4, 1, 1)
    torch.testing.assert_close(to_raw_latents(z, "kl", vae), z * std / 0.5 + mean)  # pipeline_stable_diffusion_xl.py


def test_patchify_round_trip_and_layout():
    raw = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    z = patchify_2x2(raw)
    assert z.shape == (2, 12, 2, 3)
    assert z[0, 0:4, 0, 0].tolist() == [raw[0, 0, 0, 0], raw[0, 0, 0, 1], raw[0, 0, 1, 0], raw[0, 0, 1, 1]]
    torch.testing.assert_close(unpatchify_2x2(z), raw)


def _flux2_stats_holder() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=32, norm_num_groups=4, mid_block_add_attention=False,
    )
    g = torch.Generator().manual_seed(0)
    vae.bn.running_mean.copy_(0.5 * torch.randn(128, generator=g))
    vae.bn.running_var.copy_(2.0 + torch.rand(128, generator=g))
    return vae.eval()


def _photo(assets, name: str, size: tuple[int, int]) -> torch.Tensor:
    image = Image.open(assets / "images" / name).convert("RGB").resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255)[None]  # (1, 3, H, W)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / torch.mean((a - b) ** 2)))


@pytest.mark.parametrize("name,size", [("astronaut.png", (256, 256)), ("rocket.png", (256, 176))])
def test_flux2_tae_path_decodes_a_real_photo(assets, name, size):
    """decoder=tae for flux2: real TAEF2 weights, latents in FLUX.2's training space (BN-normalised, 2x2)."""
    photo = _photo(assets, name, size)
    vae = _flux2_stats_holder()
    with torch.no_grad():
        raw = load_tae(assets / "taesd" / "taef2_encoder.pth", "taef2_encoder")(photo)  # (1, 32, H/8, W/8)
    z = flux2_from_raw(raw, vae)  # what a FLUX.2 training script caches: (1, 128, H/16, W/16)
    assert z.shape == (1, 128, size[1] // 16, size[0] // 16)
    tae = load_tiny_decoder(assets / "taesd" / "taef2_decoder.pth", "flux2")
    decoder = LatentDecoder(Decoder.tae, "flux2", vae=vae, tae=tae)
    images = decoder(z)
    assert images.shape == photo.shape and images.min() >= 0 and images.max() <= 1
    assert _psnr(images, photo) > 25
    # the same latents without undoing the BN normalisation decode to a much worse image
    wrong = tae(unpatchify_2x2(z)).clamp(0, 1)
    assert _psnr(wrong, photo) < _psnr(images, photo) - 5


def test_tae_file_for_a_family_without_its_own_tiny_decoder(assets):
    with pytest.raises(ValueError, match="AutoencoderTiny directory"):
        load_tiny_decoder(assets / "taesd" / "taef2_decoder.pth", "kl")
    with pytest.raises(FileNotFoundError, match="tae_checkpoint"):
        load_tiny_decoder("/nonexistent/taesd3", "kl")


def test_flux2_without_bn_stats_is_refused():
    with pytest.raises(ValueError, match="BatchNorm statistics"):
        to_raw_latents(torch.randn(1, 128, 2, 2), "flux2", object())


def test_pixels_range():
    x = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(pixels_to_unit(x, [-1, 1]), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(pixels_to_unit(x, [0, 1]), torch.tensor([0.0, 0.0, 1.0]))


class _WithVAE(TinyFlow):
    def __init__(self) -> None:
        super().__init__("sd3")
        self.vae = _tiny_kl(scaling_factor=1.7, shift_factor=0.3).requires_grad_(False)


def test_callback_decodes_with_the_module_vae(repa_options):
    """decoder=vae end to end: the teacher sees vae.decode(z / sf + shift); the VAE encoder can be dropped."""
    module = _WithVAE()
    options = {**repa_options, "decoder": "vae", "drop_vae_encoder": True}
    repa = RepaCallback(family="sd3", block_index=1, **options)
    fit = trainer(2, [repa])
    fit.fit(module, loader("sd3"))
    assert module.vae.encoder is None and module.vae.quant_conv is None
    batch = next(iter(loader("sd3")))
    images = repa.teacher.images(batch, batch["latents"])
    want = ((module.vae.decode(batch["latents"] / 1.7 + 0.3).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(images, want)
    assert images.shape == (2, 3, 16, 32)
    assert "repa/similarity" in fit.callback_metrics


class _Flux2WithTAE(TinyFlow):
    """A FLUX.2 module on real 128-channel training latents, with only the VAE's BatchNorm resident."""

    def __init__(self) -> None:
        super().__init__("flux2")
        self.transformer = type(self.transformer)(**{**self.fam.config, "in_channels": 128})
        self.vae = _flux2_stats_holder().requires_grad_(False)


def test_flux2_callback_with_decoder_tae_sees_the_photo(assets, repa_options):
    photo = torch.cat([_photo(assets, "astronaut.png", (128, 128)), _photo(assets, "coffee.png", (128, 128))])
    module = _Flux2WithTAE()
    with torch.no_grad():
        raw = load_tae(assets / "taesd" / "taef2_encoder.pth", "taef2_encoder")(photo)
    latents = flux2_from_raw(raw, module.vae)  # (2, 128, 8, 8)
    data = [{"latents": latents[i], "ids": i} for i in range(2)]
    options = {**repa_options, "decoder": "tae", "tae_checkpoint": str(assets / "taesd" / "taef2_decoder.pth")}
    repa = RepaCallback(family="flux2", block_index=3, **options)
    fit = trainer(2, [repa])
    fit.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    images = repa.teacher.images({"latents": latents}, latents)
    assert all(_psnr(images[i], photo[i]) > 25 for i in range(2))
    assert "repa/similarity" in fit.callback_metrics


def _tiny_autoencoder_tiny(tmp_path, **config):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tae = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                          num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4, latent_channels=4, **config)
    tae.save_pretrained(tmp_path / "tae")
    return load_tiny_decoder(tmp_path / "tae", "kl")


@pytest.mark.parametrize("config", [{}, {"scaling_factor": 0.5, "shift_factor": 0.1}])
def test_autoencoder_tiny_decodes_diffusion_space_latents_without_the_vae(tmp_path, config):
    """As the pipelines do with TAESD/TAESD3/TAEF1: `tae.decode(z / tae_sf + tae_shift)`; no VAE needed."""
    tae = _tiny_autoencoder_tiny(tmp_path, **config)
    z = torch.randn(2, 4, 4, 6)
    images = LatentDecoder("tae", "kl", vae=None, tae=tae)(z)
    sf, shift = config.get("scaling_factor", 1.0), config.get("shift_factor", 0.0)
    want = ((tae.decode(z / sf + shift).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(images, want)
    assert images.shape == (2, 3, 32, 48)


@pytest.mark.parametrize("force_upcast", [True, False])
def test_force_upcast_decodes_in_float32_under_autocast(force_upcast):
    vae = _tiny_kl(force_upcast=force_upcast)
    z = torch.randn(1, 4, 8, 8)
    full = LatentDecoder("vae", "kl", vae=vae)(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = LatentDecoder("vae", "kl", vae=vae)(z)
    if force_upcast:
        torch.testing.assert_close(mixed, full)
    else:
        assert not torch.equal(mixed, full)  # bf16 convolutions


def test_drop_vae_encoder_happens_before_the_optimizer_and_survives_resume(tmp_path, repa_options):
    from lightning.pytorch.callbacks import ModelCheckpoint

    options = {**repa_options, "decoder": "vae", "drop_vae_encoder": True}

    def fit(module, steps, **kwargs):
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        t = trainer(steps, [RepaCallback(family="sd3", block_index=1, **options), ckpt], enable_checkpointing=True)
        t.fit(module, loader("sd3"), **kwargs)
        return t

    module = _WithVAE()
    t = fit(module, 2)
    optimised = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in module.parameters()}, "the dropped encoder must not be in the optimizer"
    assert not any(k.startswith("vae.encoder.") for k in module.state_dict())
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    resumed = _WithVAE()
    assert fit(resumed, 4, ckpt_path=str(ckpt)).global_step == 4  # a fresh module (with encoder) resumes
    assert resumed.vae.encoder is None


def test_a_checkpoint_with_the_vae_encoder_loads_after_the_drop():
    from lightning_repa.teachers.decoders import drop_vae_encoder

    full = _WithVAE()
    state = full.state_dict()
    dropped = _WithVAE()
    drop_vae_encoder(dropped.vae)
    dropped.load_state_dict(state)  # strict: the encoder keys are discarded, everything else loads
    torch.testing.assert_close(dropped.vae.decoder.conv_in.weight, full.vae.decoder.conv_in.weight)


def test_a_flux_fit_with_a_real_kl_vae_raises_no_future_warning_from_the_package(repa_options):
    """Config values are read from `vae.config` and buffers as buffers: diffusers deprecates reading a
    config value through the model's attributes (a FutureWarning on every decode)."""
    import warnings

    class FluxWithVAE(TinyFlow):
        def __init__(self) -> None:
            super().__init__("flux")
            # the tiny flux latents have 4 channels, as _tiny_kl's VAE; FLUX's scale and shift
            self.vae = _tiny_kl(scaling_factor=0.3611, shift_factor=0.1159).requires_grad_(False)

    options = {**repa_options, "decoder": "vae"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(2, [RepaCallback(family="flux", block_index=1, **options)]).fit(FluxWithVAE(), loader("flux"))
    ours = [w for w in caught if issubclass(w.category, FutureWarning) and "lightning_repa" in w.filename]
    assert ours == [], [str(w.message) for w in ours]
