"""Tests for lightning_repa.teachers.taef2 with the real pretrained TAEF2 / TAESANA weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torch import nn

from lightning_repa.teachers.taef2 import (
    _blocks,
    _conv,
    _down,
    Block,
    TAEF2Decoder,
    TAEF2Encoder,
    load_tae,
)

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
TAESD = ASSETS / "taesd"
IMAGES = ASSETS / "images"
_NEEDED = [
    TAESD / "taef2_encoder.pth",
    TAESD / "taef2_decoder.pth",
    TAESD / "taesana_encoder.pth",
    IMAGES / "astronaut.png",
    IMAGES / "coffee.png",
]
_MISSING = [str(p) for p in _NEEDED if not p.is_file()]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"shared assets not found (expected next to the repo): {_MISSING}"
)


def _photo(name: str, width: int, multiple: int) -> torch.Tensor:
    """Real photo resized to ``width`` (aspect kept), height centre-cropped to ``multiple``.

    Returns (1, 3, H, W) float32 in [0, 1].
    """
    im = Image.open(IMAGES / f"{name}.png").convert("RGB")
    height = round(im.height * width / im.width)
    im = im.resize((width, height), Image.BICUBIC)
    top = (height % multiple) // 2
    im = im.crop((0, top, width, top + height - height % multiple))
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
    return x[None]


def _psnr(y: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR in dB of ``y`` (clamped to [0, 1]) against ``x`` in [0, 1]."""
    mse = ((y.clamp(0, 1) - x) ** 2).mean()
    return float(10 * torch.log10(1 / mse))


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return load_tae(TAESD / "taef2_encoder.pth", "taef2_encoder")


@pytest.fixture(scope="module")
def decoder() -> torch.nn.Module:
    return load_tae(TAESD / "taef2_decoder.pth", "taef2_decoder")


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    # astronaut 512x512 -> 256x256; coffee 512x341 -> 256x170 -> cropped to 256x168
    return {"astronaut": _photo("astronaut", 256, 8), "coffee": _photo("coffee", 256, 8)}


def test_loaded_modules_are_frozen_fp32(encoder, decoder) -> None:
    assert isinstance(encoder, TAEF2Encoder) and isinstance(decoder, TAEF2Decoder)
    for m in (encoder, decoder):
        assert not m.training
        params = list(m.parameters())
        assert params and all(not p.requires_grad for p in params)
        assert all(p.dtype == torch.float32 for p in params)
    # the lowest-resolution blocks carry the pool branch, the others do not
    assert [i for i, m in enumerate(encoder) if isinstance(m, Block) and m.pool is not None] == [11, 12, 13]
    assert [i for i, m in enumerate(decoder) if isinstance(m, Block) and m.pool is not None] == [3, 4, 5]


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_real_round_trip(encoder, decoder, photos, name: str) -> None:
    x = photos[name]  # (1, 3, H, W)
    b, _, h, w = x.shape
    with torch.no_grad():
        z = encoder(x)  # (B, 32, H/8, W/8)
        y = decoder(z)  # (B, 3, H, W)
    assert z.shape == (b, 32, h // 8, w // 8)
    assert y.shape == x.shape
    assert torch.isfinite(z).all() and torch.isfinite(y).all()
    # decoder output is an image roughly in [0, 1] (not [-1, 1])
    assert -0.25 < float(y.min()) and float(y.max()) < 1.25
    assert _psnr(y, x) > 25.0  # measured ~29-30 dB


def test_decoder_soft_clamps_latents(decoder) -> None:
    # tanh(x / 3) * 3 saturates at 3: huge latents decode to the same bounded image
    big = torch.full((1, 32, 4, 4), 1e3)
    with torch.no_grad():
        y1, y2 = decoder(big), decoder(10 * big)  # (1, 3, 32, 32)
    assert y1.shape == (1, 3, 32, 32)
    assert torch.isfinite(y1).all() and float(y1.abs().max()) < 10
    torch.testing.assert_close(y1, y2)


def test_round_trip_fails_with_random_decoder(encoder, photos) -> None:
    x = photos["astronaut"]
    torch.manual_seed(0)
    random_decoder = TAEF2Decoder().eval()
    with torch.no_grad():
        y = random_decoder(encoder(x))
    assert y.shape == x.shape
    assert _psnr(y, x) < 15.0  # measured ~5-6 dB


def test_random_latents_do_not_reproduce_photo(encoder, decoder, photos) -> None:
    x = photos["coffee"]
    with torch.no_grad():
        z = encoder(x)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        real, fake = _psnr(decoder(z), x), _psnr(decoder(noise), x)
    assert fake < 15.0  # measured ~10 dB
    assert real - fake > 10.0


class TAESanaEncoder(nn.Sequential):
    """TAESANA encoder (Sana DC-AE f32c32), built from the package's TAE blocks: (B, 3, H, W) ->
    (B, 32, H/32, W/32). The test's own: it proves the blocks hold a second real TAE."""

    def __init__(self, latent_channels: int = 32) -> None:
        super().__init__(
            _conv(3, 32, stride=2), nn.ReLU(),  # 0-1: (B, 32, H/2, W/2)
            _conv(32, 64, stride=2), nn.ReLU(), *_blocks(1),  # 2-4: (B, 64, H/4, W/4)
            _down(), *_blocks(3),  # 5-8: (B, 64, H/8, W/8)
            _down(), *_blocks(3),  # 9-12: (B, 64, H/16, W/16)
            _down(), *_blocks(3),  # 13-16: (B, 64, H/32, W/32)
            _conv(64, latent_channels),  # 17: (B, 32, H/32, W/32)
        )


def test_taesana_encoder_real_weights(photos) -> None:
    sd = torch.load(TAESD / "taesana_encoder.pth", map_location="cpu", weights_only=True)
    enc = TAESanaEncoder()
    enc.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    enc.eval()
    a = photos["astronaut"]  # (1, 3, 256, 256)
    c = _photo("coffee", 256, 32)  # (1, 3, 160, 256)
    with torch.no_grad():
        za, zc = enc(a), enc(c)
        za_flip = enc(a.flip(-1))
    assert za.shape == (1, 32, 256 // 32, 256 // 32)
    assert zc.shape == (1, 32, 160 // 32, 256 // 32)
    # real features tell images apart (a random init gives cosine ~1.0 for any pair)
    pooled = lambda z: z.mean(dim=(2, 3)).flatten()
    same = torch.cosine_similarity(pooled(za), pooled(za_flip), dim=0)
    diff = torch.cosine_similarity(pooled(za), pooled(zc), dim=0)
    assert same > 0.8 and diff < 0.6 and same - diff > 0.3


def test_renamed_key_is_refused(tmp_path: Path) -> None:
    sd = torch.load(TAESD / "taef2_encoder.pth", map_location="cpu", weights_only=True)
    sd["11.pool_renamed.0.weight"] = sd.pop("11.pool.0.weight")
    bad = tmp_path / "bad_encoder.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError) as info:
        load_tae(bad, "taef2_encoder")
    msg = str(info.value)
    assert "11.pool.0.weight" in msg  # missing
    assert "11.pool_renamed.0.weight" in msg  # unexpected
    assert "bad_encoder.pth" in msg


def test_state_dict_without_pool_branch_is_refused(tmp_path: Path) -> None:
    # the SD1-style layout (what diffusers' AutoencoderTiny expects) lacks the pool keys
    sd = torch.load(TAESD / "taef2_decoder.pth", map_location="cpu", weights_only=True)
    sd = {k: v for k, v in sd.items() if ".pool." not in k}
    path = tmp_path / "no_pool.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing keys \['3\.pool\.0\.weight'"):
        load_tae(path, "taef2_decoder")


def test_wrong_kind_for_file_is_refused() -> None:
    # TAESANA weights are not a TAEF2 encoder
    with pytest.raises(ValueError, match="taesana_encoder.pth"):
        load_tae(TAESD / "taesana_encoder.pth", "taef2_encoder")


def test_missing_file_and_unknown_kind(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_tae(missing, "taef2_encoder")
    with pytest.raises(ValueError, match="taef2_decoder") as info:
        load_tae(TAESD / "taef2_decoder.pth", "taesd_decoder")
    assert "taef2_encoder" in str(info.value) and "taef2_decoder" in str(info.value)
