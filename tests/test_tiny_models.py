"""The tiny diffusers denoisers of `lightning_repa.testing.tiny_models`: shapes, gradients, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_repa.testing.tiny_models import TINY_FAMILIES, TinyFamily, pack2x2, unpack2x2

FAMILIES = ("flux", "flux2", "sd3", "chroma", "sana", "pixart", "hidream", "auraflow", "lumina2")
pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")  # from diffusers' chroma
SHAPES = [(8, 8), (8, 16)]  # square and 1:2 latents


def _inputs(fam: TinyFamily, hw: tuple[int, int], seed: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(x_t, t, cond) for a batch of 2 latents of spatial size hw."""
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, fam.latent_channels, *hw, generator=g)  # (B, C, h, w)
    t = torch.rand(2, generator=g)  # (B,)
    return x_t, t, fam.make_cond(2, seed)


def _run(fam: TinyFamily, hw: tuple[int, int], seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """(model, x_t, prediction)."""
    model = fam.build(seed)
    x_t, t, cond = _inputs(fam, hw, seed)
    return model, x_t, fam.forward(model, x_t, t, cond)


def test_registry() -> None:
    # UNets: tests/test_tiny_unets.py; dit, flux3, qwenimage, z_image: tests/test_frontier_families.py
    assert tuple(TINY_FAMILIES) == FAMILIES + ("dit", "flux3", "qwenimage", "z_image") + ("sd15", "sdxl", "kolors")
    for name, fam in TINY_FAMILIES.items():
        assert fam.name == name
        model = fam.build()
        assert type(model) is fam.model_class
        if name not in FAMILIES:
            continue
        block_lists = [m for m in model.children() if isinstance(m, nn.ModuleList)]
        n_blocks = sum(len(m) for m in block_lists if type(m[0]).__name__.endswith("Block"))
        assert n_blocks >= 3, name


@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("name", FAMILIES)
def test_shape_and_gradients(name: str, hw: tuple[int, int]) -> None:
    model, x_t, pred = _run(TINY_FAMILIES[name], hw)
    assert pred.shape == x_t.shape
    assert torch.isfinite(pred).all()
    pred.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("name", FAMILIES)
def test_deterministic(name: str, hw: tuple[int, int]) -> None:
    fam = TINY_FAMILIES[name]
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        a, b, c = (_run(fam, hw, seed)[2] for seed in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), rng_before)  # build/make_cond leave the global RNG alone
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_make_cond_is_seeded() -> None:
    for fam in TINY_FAMILIES.values():
        a, b, c = fam.make_cond(3, seed=1), fam.make_cond(3, seed=1), fam.make_cond(3, seed=2)
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)


def test_lumina2_caption_mask_is_ragged() -> None:
    mask = TINY_FAMILIES["lumina2"].make_cond(2, seed=0)["encoder_attention_mask"]  # (B, L) bool
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 3]


def test_flux_packing_round_trip() -> None:
    x = torch.randn(2, 4, 8, 16)
    tokens = pack2x2(x)  # (B, 4*8, 16)
    assert tokens.shape == (2, 32, 16)
    assert torch.equal(tokens[:, 1], x[:, :, 0:2, 2:4].reshape(2, 16))  # row-major over the (4, 8) grid
    assert torch.equal(unpack2x2(tokens, 8, 16), x)


@pytest.mark.parametrize("name", FAMILIES)
def test_token_grid(name: str) -> None:
    fam = TINY_FAMILIES[name]
    expected = {"flux": (4, 8), "chroma": (4, 8), "flux2": (8, 16), "sana": (8, 16)}.get(name, (4, 8))
    assert fam.token_grid(8, 16) == expected


def test_hidream_eval_mode_same_prediction() -> None:
    # train mode returns patchified (B, C, S, p*p) output that `forward` unpatchifies itself
    fam = TINY_FAMILIES["hidream"]
    model, _, pred_train = _run(fam, (8, 16))
    with torch.no_grad():
        pred_eval = fam.forward(model.eval(), *_inputs(fam, (8, 16), seed=0))
    torch.testing.assert_close(pred_eval, pred_train, rtol=1e-5, atol=1e-5)
