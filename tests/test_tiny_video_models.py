"""The tiny diffusers video denoisers and VAEs of `lightning_repa.testing.tiny_video_models`: shapes,
gradients, determinism, the in-block token layout, and the VAEs' frame bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_repa.testing.tiny_video_models import (
    TINY_VIDEO_FAMILIES,
    VIDEO_FACTS,
    VIDEO_VAE_FACTS,
    TinyVideoFamily,
    changed_tokens,
    denormalize_latents,
    frame_tokens,
    kandinsky_unfractal,
    ltx_pack,
    ltx_unpack,
    normalize_latents,
    tiny_video_vae,
    vae_ratios,
)

FAMILIES = ("wan", "ltxvideo", "sanavideo", "kandinsky5_video")
SHAPES = [(3, 4, 8), (2, 8, 8)]  # (T, h, w): non-square frames, square frames


def _inputs(fam: TinyVideoFamily, thw: tuple[int, int, int], seed: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, fam.latent_channels, *thw, generator=g)  # (B, C, T, h, w)
    return x_t, torch.rand(2, generator=g), fam.make_cond(2, seed)


def _run(fam: TinyVideoFamily, thw: tuple[int, int, int], seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    model = fam.build(seed)
    x_t, t, cond = _inputs(fam, thw, seed)
    return model, x_t, fam.forward(model, x_t, t, cond)


def _capture(model: nn.Module, fam: TinyVideoFamily, thw: tuple[int, int, int]) -> dict[tuple[str, int], object]:
    """Output of every block of every block list, keyed by (attribute, index)."""
    outputs: dict[tuple[str, int], object] = {}
    handles = [
        block.register_forward_hook(lambda m, a, o, key=(attr, i): outputs.__setitem__(key, o))
        for attr, _ in VIDEO_FACTS[fam.name].block_lists
        for i, block in enumerate(getattr(model, attr))
    ]
    try:
        x_t, t, cond = _inputs(fam, thw, 0)
        with torch.no_grad():
            fam.forward(model, x_t, t, cond)
    finally:
        for h in handles:
            h.remove()
    return outputs


def test_registry() -> None:
    assert tuple(TINY_VIDEO_FAMILIES) == FAMILIES + ("hunyuan_video15", "ltx2")  # those two: test_frontier_families
    assert set(VIDEO_FACTS) == set(VIDEO_VAE_FACTS) == set(TINY_VIDEO_FAMILIES)
    for name, fam in TINY_VIDEO_FAMILIES.items():
        model = fam.build()
        assert type(model) is fam.model_class and type(model).__name__ == VIDEO_FACTS[name].model_class
        lists = {n: len(m) for n, m in model.named_children() if isinstance(m, nn.ModuleList)}
        assert lists == dict(VIDEO_FACTS[name].block_lists), name
        assert lists[VIDEO_FACTS[name].align_blocks] >= 3  # block index 1 or 2 is meaningful


@pytest.mark.parametrize("thw", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", FAMILIES)
def test_shape_and_gradients(name: str, thw: tuple[int, int, int]) -> None:
    fam = TINY_VIDEO_FAMILIES[name]
    model = fam.build(0)
    x_t, t, cond = _inputs(fam, thw, 0)
    x_t.requires_grad_(True)
    pred = fam.forward(model, x_t, t, cond)
    assert pred.shape == x_t.shape
    assert torch.isfinite(pred).all()
    pred.square().mean().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", FAMILIES)
def test_deterministic(name: str) -> None:
    fam = TINY_VIDEO_FAMILIES[name]
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        a, b, c = (_run(fam, (3, 4, 8), seed)[2] for seed in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), rng_before)  # build/make_cond leave the global RNG alone
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_make_cond_is_seeded() -> None:
    for fam in TINY_VIDEO_FAMILIES.values():
        a, b, c = fam.make_cond(3, seed=1), fam.make_cond(3, seed=1), fam.make_cond(3, seed=2)
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("thw", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", FAMILIES)
def test_token_grid_matches_hooked_blocks(name: str, thw: tuple[int, int, int]) -> None:
    """Every image block returns one tensor of exactly T'*H'*W' tokens (no text, no padding)."""
    fam = TINY_VIDEO_FAMILIES[name]
    model = fam.build(0)
    grid = fam.token_grid(*thw)
    # independent count: latent positions / patch volume, from the model's own config
    patch = model.config.patch_size
    pt, ph, pw = (model.config.patch_size_t, patch, patch) if isinstance(patch, int) else tuple(patch)
    assert grid == (thw[0] // pt, thw[1] // ph, thw[2] // pw)
    facts = VIDEO_FACTS[name]
    outputs = _capture(model, fam, thw)
    image = [v for (attr, _), v in outputs.items() if attr == facts.align_blocks]
    assert len(image) == dict(facts.block_lists)[facts.align_blocks]
    for out in image:
        assert isinstance(out, Tensor) and facts.block_output == "tensor"
        assert out.shape == (2, math.prod(grid), model.config.get("model_dim") or 32)
        assert frame_tokens(out, grid).shape == (2, grid[0], grid[1] * grid[2], out.shape[-1])
    if name == "kandinsky5_video":  # the text blocks hold the L text tokens only
        assert outputs[("text_transformer_blocks", 0)].shape[1] == 5


@pytest.mark.parametrize("name", FAMILIES)
def test_flatten_order_is_frame_major(name: str) -> None:
    """Perturbing one latent position changes exactly the token (t', y', x') at block 0's input,
    at index t'*H'*W' + y'*W' + x' (also for positions inside a patch, not at its corner)."""
    fam = TINY_VIDEO_FAMILIES[name]
    model = fam.build(0)
    shape = (2, fam.latent_channels, 3, 4, 8)
    tt, hh, ww = fam.token_grid(*shape[2:])
    pt, ph, pw = fam.patch
    for t, y, x in [(0, 0, 0), (0, 0, 7), (0, 3, 0), (1, 0, 0), (2, 3, 5), (1, 2, 3)]:
        expected = (t // pt) * hh * ww + (y // ph) * ww + x // pw
        assert changed_tokens(model, fam, shape, (t, y, x)) == [expected], (name, (t, y, x))


def test_token_grid_refuses_bad_sizes() -> None:
    fam = TINY_VIDEO_FAMILIES["wan"]
    with pytest.raises(ValueError, match="multiples of"):
        fam.token_grid(3, 5, 8)
    model = fam.build()
    with pytest.raises(ValueError, match=r"\(B, C, T, h, w\)"):
        fam.forward(model, torch.randn(2, 4, 8, 8), torch.rand(2), fam.make_cond(2))
    with pytest.raises(ValueError, match="expected"):
        frame_tokens(torch.randn(2, 10, 32), (3, 2, 2))


def test_ltx_pack_roundtrip_and_order() -> None:
    x = torch.randn(2, 3, 4, 6, 8)
    for p, pt in [(1, 1), (2, 1), (2, 2)]:
        tokens = ltx_pack(x, p, pt)
        grid = (4 // pt, 6 // p, 8 // p)
        assert tokens.shape == (2, math.prod(grid), 3 * pt * p * p)
        assert torch.equal(ltx_unpack(tokens, grid, p, pt), x)
    # token (t, y, x) of patch 1 is the latent column at (t, y, x)
    assert torch.equal(ltx_pack(x, 1, 1)[:, 1 * 48 + 2 * 8 + 5], x[:, :, 1, 2, 5])


def test_kandinsky_fractal_order() -> None:
    """With nabla attention (`to_fractal`), diffusers tiles each frame 8x8; `kandinsky_unfractal`
    undoes it. Checked on the library function and on the model's first visual block."""
    from diffusers.models.transformers.transformer_kandinsky import fractal_flatten

    b, t, h, w = 1, 2, 16, 24
    ids = torch.arange(b * t * h * w, dtype=torch.float32).reshape(b, t, h, w, 1)
    flat, _ = fractal_flatten(ids, torch.zeros_like(ids), (b, t, h, w), block_mask=True)
    assert flat[0, 1 * h * w + (9 // 8 * 3 + 17 // 8) * 64 + (9 % 8) * 8 + 17 % 8, 0] == ids[0, 1, 9, 17, 0]
    assert torch.equal(kandinsky_unfractal(flat, (t, h, w)).flatten(), ids.flatten())
    flat_default, _ = fractal_flatten(ids, torch.zeros_like(ids), (b, t, h, w), block_mask=False)
    assert torch.equal(flat_default.flatten(), ids.flatten())  # default path: plain (T, H, W)


@pytest.mark.filterwarnings("ignore")
def test_kandinsky_nabla_block_order() -> None:
    """The real model with `sparse_params["to_fractal"]` (flex attention, forward only on CPU)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    fam = TINY_VIDEO_FAMILIES["kandinsky5_video"]
    model = fam.build(0)
    active = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        model.set_attention_backend("flex")
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"flex attention unavailable: {exc}")
    grid = (2, 8, 16)
    n_tiles = grid[0] * (grid[1] // 8) * (grid[2] // 8)
    sparse = {"sta_mask": torch.ones(1, 1, n_tiles, n_tiles, dtype=torch.bool), "to_fractal": True, "P": 0.9}
    seen: list[Tensor] = []
    model.visual_transformer_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    x = torch.randn(1, 2, 16, 32, 9)  # (B, T, h, w, 2C+1), channels last
    x2 = x.clone()
    x2[0, 1, 2 * 5, 2 * 11, :4] += 10.0  # token (1, 5, 11)
    cond = fam.make_cond(1)
    try:
        with torch.no_grad():
            for v in (x, x2):
                model(hidden_states=v, timestep=torch.tensor([500.0]), visual_rope_pos=[torch.arange(n) for n in grid],
                      text_rope_pos=torch.arange(5), scale_factor=(1.0, 2.0, 2.0), sparse_params=sparse,
                      return_dict=False, **cond)
    finally:  # set_attention_backend also sets diffusers' global active backend: restore it for later tests
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    changed = torch.nonzero((seen[1] - seen[0]).abs().amax(dim=(0, 2)) > 1e-6).flatten().tolist()
    assert changed == [1 * 128 + (5 // 8 * 2 + 11 // 8) * 64 + (5 % 8) * 8 + 11 % 8]


# ---------------------------------------------------------------- VAEs


def _encode(vae: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean


@pytest.mark.parametrize("name", FAMILIES)
def test_vae_shapes_and_frame_counts(name: str) -> None:
    vae = tiny_video_vae(name).eval()
    facts = VIDEO_VAE_FACTS[name]
    r, s = vae_ratios(vae)
    assert (r, s) == (facts.temporal, facts.tiny_spatial)
    assert type(vae).__name__ == facts.vae_class
    frames = 1 + 2 * r
    z = _encode(vae, torch.rand(1, 3, frames, 32, 48) * 2 - 1)
    assert z.shape == (1, TINY_VIDEO_FAMILIES[name].latent_channels, 3, 32 // s, 48 // s)
    with torch.no_grad():
        assert vae.decode(z).sample.shape == (1, 3, frames, 32, 48)
    for f in (1, 2, r, r + 1, r + 2):  # 1 + (F - 1) // r: a ragged tail is dropped
        assert _encode(vae, torch.zeros(1, 3, f, 16, 16)).shape[2] == facts.latent_frames(f), f
    assert [list(facts.pixel_frames_of_latent(k)) for k in range(3)] == [
        [0], list(range(1, r + 1)), list(range(r + 1, 2 * r + 1))
    ]


def _per_frame_group_norm(vae: nn.Module) -> None:
    """GroupNorm over each frame alone: HunyuanVideo's clip-wide GroupNorm statistics otherwise
    leak every frame into every latent, hiding the causal structure of its convolutions."""
    import torch.nn.functional as F

    for gn in vae.modules():
        if isinstance(gn, nn.GroupNorm):
            def forward(x: Tensor, gn: nn.GroupNorm = gn) -> Tensor:
                if x.ndim != 5:
                    return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
                b, c, t, h, w = x.shape
                y = F.group_norm(x.transpose(1, 2).reshape(b * t, c, h, w), gn.num_groups, gn.weight, gn.bias, gn.eps)
                return y.reshape(b, t, c, h, w).transpose(1, 2)

            gn.forward = forward


@pytest.mark.parametrize("name", ("wan", "ltxvideo", "kandinsky5_video"))
def test_vae_causal_frame_groups(name: str) -> None:
    """Perturbing pixel frame j first changes latent frame ceil(j / r): {0}, {1..r}, {r+1..2r}."""
    vae = tiny_video_vae(name).eval()
    if name == "kandinsky5_video":
        _per_frame_group_norm(vae)
    facts = VIDEO_VAE_FACTS[name]
    r = facts.temporal
    x = torch.rand(1, 3, 1 + 2 * r, 16, 16) * 2 - 1
    z = _encode(vae, x)
    for j in range(1 + 2 * r):
        x2 = x.clone()
        x2[:, :, j] += 0.5
        changed = torch.nonzero((_encode(vae, x2) - z).abs().amax(dim=(0, 1, 3, 4)) > 1e-6).flatten().tolist()
        first = -(-j // r)
        assert changed == list(range(first, 3)), (name, j, changed)
        assert j in facts.pixel_frames_of_latent(first)


@pytest.mark.parametrize("name", FAMILIES)
def test_vae_normalisation(name: str) -> None:
    vae = tiny_video_vae(name)
    z = torch.randn(2, TINY_VIDEO_FAMILIES[name].latent_channels, 2, 3, 4)
    x = normalize_latents(vae, z)
    assert torch.allclose(denormalize_latents(vae, x), z, atol=1e-6)
    # the pipelines' own formulas
    if name in ("wan", "sanavideo"):
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        expected = x / std + mean  # pipeline_wan.py, pipeline_sana_video.py
    elif name == "ltxvideo":
        mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
        expected = x * std / vae.config.scaling_factor + mean  # LTXPipeline._denormalize_latents
    else:
        expected = x / vae.config.scaling_factor  # Kandinsky5T2VPipeline
    assert torch.allclose(denormalize_latents(vae, x), expected, atol=1e-6)
    assert not torch.allclose(x, z)  # the tiny VAEs' statistics are not the identity


@pytest.mark.parametrize("name", FAMILIES)
def test_vae_latents_feed_the_denoiser(name: str) -> None:
    """encode -> normalise -> denoiser -> de-normalise -> decode, with the tiny pair of a family."""
    fam, vae = TINY_VIDEO_FAMILIES[name], tiny_video_vae(name).eval()
    r, s = vae_ratios(vae)
    video = torch.rand(2, 3, 1 + 2 * r, 4 * s, 8 * s) * 2 - 1
    x0 = normalize_latents(vae, _encode(vae, video))  # (B, C, 3, 4, 8)
    assert x0.shape == (2, fam.latent_channels, 3, 4, 8)
    with torch.no_grad():
        pred = fam.forward(fam.build(0), x0, torch.full((2,), 0.5), fam.make_cond(2))
        out = vae.decode(denormalize_latents(vae, pred)).sample
    assert out.shape == video.shape
