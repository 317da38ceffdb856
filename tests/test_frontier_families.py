"""Six more families on the real diffusers 0.42.1 classes at tiny sizes, in `lightning_repa.models.families`: dit, flux3, qwenimage, z_image (REPA, images) and hunyuan_video15, ltx2
(CREPA, video).

`PROPOSED` holds the shipped family entries of lightning_repa/families.py (selectors in
lightning_repa/selectors.py). `REFERENCE` slices every block list's
output independently, written from the diffusers source: by the reference/caption/text lengths read
from the denoiser call, where the selectors count the image tokens of the latent grid. Every block
is captured by `BlockCapture` with the proposed entry and compared to a plain forward hook on the
same block, on square and non-square latents.

Facts pinned here (diffusers 0.42.1; pipelines read from source: `transformers` is not installed, so
the pipelines themselves are dummy objects and cannot run):
- DiTTransformer2DModel unpatchifies its output as a square: the blocks take a non-square grid, the
  model's forward then fails.
- flux3's image blocks sit in a ModuleDict (`mode_blocks["image"]`): the entry names them by a dotted
  path, which `BlockList.modules` resolves.
- Parameters the class leaves without gradient in a (video-)only loss: the last dual-stream block's
  text branch (qwenimage, hunyuan_video15), LTX-2's audio head and last audio updates, flux3's
  `image_cond` modules in text-to-image calls; HunyuanVideo 1.5's image embedder gets zero gradient in
  text-to-video (its tokens are multiplied by 0).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from helpers import quick

from lightning_repa.models.capture import BlockCapture
from lightning_repa.teachers.decoders import to_raw_latents
from lightning_repa.models.families import FAMILIES, Family, call_arguments
from lightning_repa.models.selectors import Z_IMAGE_SEQ_MULTIPLE, _z_image_layers, _z_image_refiner
from lightning_repa.testing.tiny_models import FLUX3_REFERENCE_GRID, TEXT_LEN, TINY_FAMILIES, pack2x2
from lightning_repa.testing.tiny_video_models import (
    TINY_VIDEO_FAMILIES,
    VIDEO_FACTS,
    VIDEO_VAE_FACTS,
    changed_tokens,
    denormalize_latents,
    frame_tokens,
    normalize_latents,
    tiny_video_vae,
    vae_ratios,
)

# ==================================================================================================
# Proposed additions to lightning_repa/families.py
# ==================================================================================================


PROPOSED: dict[str, Family] = {name: FAMILIES[name] for name in
                               ("dit", "flux3", "qwenimage", "z_image", "hunyuan_video15", "ltx2")}  # shipped entries
IMAGE = ("dit", "flux3", "qwenimage", "z_image")
VIDEO = ("hunyuan_video15", "ltx2")

# ==================================================================================================
# Independent references, from the diffusers source
# ==================================================================================================


def _flux3_image(o: Any, c: dict[str, Any], n: int) -> Tensor:
    """Flux3SingleTransformerBlock returns (text, content); content = [image, image_cond] (L629-633)."""
    refs = c.get("image_cond_hidden_states")
    content = o[1]
    return content if refs is None else content[:, : content.shape[1] - refs.shape[1]]


def _qwen_image(o: Any, c: dict[str, Any], n: int) -> Tensor:
    """QwenImageTransformerBlock returns (text, image); the first entry of `img_shapes` is the noisy image."""
    return o[1][:, : math.prod(c["img_shapes"][0][0])]


def _z_image_basic(o: Tensor, c: dict[str, Any], n: int) -> Tensor:
    """Basic mode: unified = [x (padded to 32), caption]; x of sample 0 is (C, F, H, W), patch 2, f_patch 1."""
    _, f, h, w = c["x"][0].shape
    return o[:, : f * (h // 2) * (w // 2)]


def _ltx2_video(o: Any, c: dict[str, Any], n: int) -> Tensor:
    """LTX2VideoTransformerBlock returns (video, audio); patch 1: one token per latent (frame, row, col)."""
    return o[0][:, : c["num_frames"] * c["height"] * c["width"]]


Reference = Callable[[Any, dict[str, Any], int], Tensor]
REFERENCE: dict[str, dict[str, Reference]] = {
    "dit": {"transformer_blocks": lambda o, c, n: o},
    "flux3": {"mode_blocks.image": lambda o, c, n: o, "single_transformer_blocks": _flux3_image},
    "qwenimage": {"transformer_blocks": _qwen_image},
    "z_image": {"layers": _z_image_basic},
    "hunyuan_video15": {"transformer_blocks": lambda o, c, n: o[0]},
    "ltx2": {"transformer_blocks": _ltx2_video},
}


def _blocks(model: nn.Module, family: str) -> list[tuple[str, nn.Module]]:
    return [(attr, block) for attr in REFERENCE[family] for block in model.get_submodule(attr)]


def _tiny(family: str):
    return TINY_VIDEO_FAMILIES[family] if family in VIDEO else TINY_FAMILIES[family]


def _latents(family: str, size: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.randn(2, _tiny(family).latent_channels, *size, generator=torch.Generator().manual_seed(seed))


# ==================================================================================================
# Tests
# ==================================================================================================

CASES = [("dit", (8, 8)), ("dit", (16, 16))] + [(f, hw) for f in IMAGE[1:] for hw in ((8, 8), (8, 16))] + [
    (f, thw) for f in VIDEO for thw in ((3, 4, 8), (2, 8, 8))]


def test_proposed_entries_cover_the_six_families():
    assert tuple(PROPOSED) == IMAGE + VIDEO and set(REFERENCE) == set(PROPOSED)
    assert [type(_tiny(f).build()).__name__ for f in PROPOSED] == [c for f in PROPOSED for c in PROPOSED[f].classes]
    for name, family in PROPOSED.items():
        assert [spec.attr for spec in family.blocks] == list(REFERENCE[name])


@pytest.mark.parametrize("family,size", CASES, ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_capture_every_block_matches_reference(family: str, size: tuple[int, ...]):
    """BlockCapture with the proposed entry, every block: (B, N, D) with N the latent token grid, equal
    to the independent slice of a plain forward hook on the same block."""
    fam, spec = _tiny(family), PROPOSED[family]
    model = fam.build(seed=0)
    blocks = _blocks(model, family)
    assert [b for _, b in blocks] == [b for _, b in spec.block_modules(model)]  # forward order, all lists
    grid = spec.grid((2, fam.latent_channels, *size), model)
    assert grid == fam.token_grid(*size)  # the family's grid rule == the tiny model's own
    n = math.prod(grid)
    call: dict[str, Any] = {}
    reference: dict[int, Tensor] = {}
    handles = [model.register_forward_pre_hook(lambda m, a, k: call.update(_bind(m, a, k)), with_kwargs=True)]
    for i, (attr, block) in enumerate(blocks):
        ref = REFERENCE[family][attr]
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=i, ref=ref: reference.__setitem__(i, ref(o, call, n).detach().clone())))
    capture = BlockCapture(model, spec, list(range(len(blocks))))
    capture.attach()
    capture.arm(n)
    try:
        pred = fam.forward(model, _latents(family, size), torch.rand(2), fam.make_cond(2, seed=0))
        width = spec.hidden_size(model)
        assert width == 32
        for i in range(len(blocks)):
            got = capture.take(i)
            assert got.shape == (2, n, width) and got.requires_grad
            torch.testing.assert_close(got, reference[i], rtol=0, atol=0)
            if family in VIDEO:
                assert frame_tokens(got, grid).shape == (2, grid[0], grid[1] * grid[2], width)
        assert pred.shape == (2, fam.latent_channels, *size)
    finally:
        capture.detach()
        for h in handles:
            h.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    return call_arguments(module, args, kwargs)


# Parameters each class leaves without a gradient (None) in this family's loss, and with an all-zero one.
def _dead(family: str, model: nn.Module, size: tuple[int, ...]) -> tuple[set[str], set[str]]:
    last = len(getattr(model, "transformer_blocks", [])) - 1
    if family == "z_image":  # the image pad token is used only when the image tokens are not a multiple of 32
        return set(), ({"x_pad_token"} if (size[0] // 2) * (size[1] // 2) % Z_IMAGE_SEQ_MULTIPLE == 0 else set())
    if family == "qwenimage":  # the last block's text stream is computed and dropped
        return {f"transformer_blocks.{last}.{p}" for p in (
            "attn.to_add_out.weight", "attn.to_add_out.bias", "txt_mlp.net.0.proj.weight", "txt_mlp.net.0.proj.bias",
            "txt_mlp.net.2.weight", "txt_mlp.net.2.bias")}, {  # text queries only feed the dropped text outputs
            f"transformer_blocks.{last}.attn.{p}"
            for p in ("add_q_proj.weight", "add_q_proj.bias", "norm_added_q.weight")}
    if family == "hunyuan_video15":
        none = {f"transformer_blocks.{last}.{p}" for p in (
            "attn.to_add_out.weight", "attn.to_add_out.bias", "ff_context.net.0.proj.weight",
            "ff_context.net.0.proj.bias", "ff_context.net.2.weight", "ff_context.net.2.bias")}
        zero = {n for n, _ in model.named_parameters() if n.startswith("image_embedder.")}  # text-to-video: x 0
        zero |= {f"transformer_blocks.{last}.attn.{p}" for p in ("add_q_proj.weight", "add_q_proj.bias",
                                                                 "norm_added_q.weight")}
        return none, zero
    if family == "ltx2":  # video-only loss: the audio head and the last block's audio-only updates
        none = {"audio_scale_shift_table", "audio_proj_out.weight", "audio_proj_out.bias"}
        none |= {n for n, _ in model.named_parameters()
                 if n.startswith((f"transformer_blocks.{last}.video_to_audio_attn.",
                                  f"transformer_blocks.{last}.audio_ff."))}
        return none, set()
    return set(), set()


@pytest.mark.parametrize("family", IMAGE + VIDEO)
def test_tiny_forward_backward_non_square(family: str):
    """Forward + backward on a non-square latent (dit: square, see test_dit_is_square_only); the only
    parameters without gradient are the ones the class itself leaves out of the prediction."""
    fam = _tiny(family)
    size = {"dit": (8, 8)}.get(family, (3, 4, 8) if family in VIDEO else (8, 16))
    model = fam.build(seed=0)
    x = _latents(family, size).requires_grad_(True)
    pred = fam.forward(model, x, torch.rand(2), fam.make_cond(2, seed=0))
    assert pred.shape == x.shape and torch.isfinite(pred).all()
    pred.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    none, zero = _dead(family, model, size)
    assert {n for n, p in model.named_parameters() if p.grad is None} == none
    assert {n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0} == zero
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", IMAGE)
def test_first_image_block_input_is_row_major(family: str):
    """Perturbing latent (y, x) changes exactly token (y//p)*W' + x//p at the first image block's input
    (before any attention): the grid rule and the row-major order of the image tokens."""
    fam, spec = TINY_FAMILIES[family], PROPOSED[family]
    model = fam.build(seed=0)
    first = {"flux3": "mode_blocks.image.0", "z_image": "noise_refiner.0"}.get(family, "transformer_blocks.0")
    size = (8, 8) if family == "dit" else (8, 16)
    gh, gw = spec.grid((2, fam.latent_channels, *size), model)
    ph, pw = size[0] // gh, size[1] // gw
    seen: list[Tensor] = []
    model.get_submodule(first).register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True)
    x, cond, t = _latents(family, size), fam.make_cond(2, seed=0), torch.full((2,), 0.5)
    for y, xx in [(0, 0), (0, size[1] - 1), (size[0] - 1, 0), (3, 5), (5, 2)]:
        x2 = x.clone()
        x2[:, :, y, xx] += 10.0
        seen.clear()
        with torch.no_grad():
            fam.forward(model, x, t, cond)
            fam.forward(model, x2, t, cond)
        changed = torch.nonzero((seen[1] - seen[0]).abs().amax(dim=(0, 2)) > 1e-6).flatten().tolist()
        assert changed == [(y // ph) * gw + xx // pw], (family, (y, xx), changed)


@pytest.mark.parametrize("family", VIDEO)
def test_first_video_block_input_is_frame_major(family: str):
    """As tests/test_tiny_video_models.py: (t, y, x) -> token t'*H'*W' + y'*W' + x' at block 0's input."""
    fam = TINY_VIDEO_FAMILIES[family]
    model = fam.build(0)
    shape = (2, fam.latent_channels, 3, 4, 8)
    tt, hh, ww = PROPOSED[family].grid(shape, model)
    pt, ph, pw = fam.patch
    for t, y, x in [(0, 0, 0), (0, 0, 7), (0, 3, 0), (1, 0, 0), (2, 3, 5), (1, 2, 3)]:
        assert changed_tokens(model, fam, shape, (t, y, x)) == [(t // pt) * hh * ww + (y // ph) * ww + x // pw]


def test_hunyuan_video15_patch_2_grid():
    """The stride is read from the config (`patch_size_t`, `patch_size`): with patch 2 the capture holds
    T * h/2 * w/2 tokens, (T', H', W') row-major."""
    base = TINY_VIDEO_FAMILIES["hunyuan_video15"]
    fam = dataclasses.replace(base, config={**base.config, "patch_size": 2}, patch=(1, 2, 2))
    model, spec = fam.build(0), PROPOSED["hunyuan_video15"]
    shape = (2, fam.latent_channels, 3, 4, 8)
    assert spec.grid(shape, model) == (3, 2, 4)
    capture = BlockCapture(model, spec, [1])
    capture.attach()
    capture.arm(3 * 2 * 4)
    fam.forward(model, torch.randn(shape), torch.rand(2), fam.make_cond(2))
    assert capture.take(1).shape == (2, 24, 32)
    capture.detach()
    assert changed_tokens(model, fam, shape, (2, 3, 5)) == [2 * 8 + 1 * 4 + 2]


def test_dit_is_square_only():
    """The blocks take a non-square grid (PatchEmbed recomputes its sin-cos table), DiTTransformer2DModel's
    unpatchify does not (`height = width = int(tokens ** 0.5)`)."""
    fam = TINY_FAMILIES["dit"]
    model = fam.build(0)
    seen: list[Tensor] = []
    model.transformer_blocks[-1].register_forward_hook(lambda m, a, o: seen.append(o))
    x, cond = torch.randn(2, 4, 8, 16), fam.make_cond(2)
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        model(hidden_states=x, timestep=torch.full((2,), 500.0), class_labels=cond["class_labels"])
    assert seen[0].shape == (2, 4 * 8, 32)  # the blocks ran on the (4, 8) grid
    with pytest.raises(ValueError, match="square"):
        fam.forward(model, x, torch.rand(2), cond)
    labels = [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]
    assert len(labels) == 3 and all(m.dropout_prob == 0 and m.embedding_table.num_embeddings == 11 for m in labels)


def test_flux3_text_to_image_and_reference_layout():
    """Without a reference image the joint stream is the N image tokens alone, and the `image_cond`
    modules get no gradient; with one (the tiny default) it is [N image, M reference]."""
    fam, spec = TINY_FAMILIES["flux3"], PROPOSED["flux3"]
    model = fam.build(0)
    seen: list[Any] = []
    model.single_transformer_blocks[0].register_forward_hook(lambda m, a, o: seen.append(o))
    cond = fam.make_cond(2)
    fam.forward(model, torch.randn(2, 16, 8, 16), torch.rand(2), cond)
    m = math.prod(FLUX3_REFERENCE_GRID)
    assert seen[0][0].shape == (2, TEXT_LEN, 32) and seen[0][1].shape == (2, 128 + m, 32)
    t2i = {k: v for k, v in cond.items() if not k.startswith("image_cond")}
    pred = fam.forward(model, torch.randn(2, 16, 8, 16), torch.rand(2), t2i)
    assert seen[1][1].shape == (2, 128, 32)
    torch.testing.assert_close(spec.blocks[1].select(seen[1][1], 128, t2i), seen[1][1], rtol=0, atol=0)
    model.zero_grad(set_to_none=True)
    pred.square().mean().backward()
    assert {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.grad is None} == {
        "early_stream_modulations.image_cond", "single_stream_modulations.image_cond", "x_embedders.image_cond",
        "mode_blocks.image_cond"}


def test_qwenimage_edit_reference_tokens_follow_the_image():
    """QwenImageEditPipeline: hidden_states = cat([latents, reference latents], 1) and img_shapes lists
    both; the image stream is [N noisy, M reference], the selector keeps the first N."""
    fam, spec = TINY_FAMILIES["qwenimage"], PROPOSED["qwenimage"]
    model = fam.build(0)
    x, ref = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 4, 4)
    capture = BlockCapture(model, spec, [0, 2])
    seen: list[Any] = []
    model.transformer_blocks[2].register_forward_hook(lambda m, a, o: seen.append(o))
    capture.attach()
    capture.arm(32)
    model(hidden_states=torch.cat([pack2x2(x), pack2x2(ref)], 1), timestep=torch.rand(2),
          img_shapes=[[(1, 4, 8), (1, 2, 2)]] * 2, return_dict=False, **fam.make_cond(2))
    assert seen[0][1].shape == (2, 32 + 4, 32)
    torch.testing.assert_close(capture.take(2), seen[0][1][:, :32], rtol=0, atol=0)
    capture.detach()


def test_z_image_omni_target_after_captions_and_condition_images():
    """Omni mode (ZImageOmniPipeline): per sample [captions..., condition images..., target] with every
    segment padded to 32; caption lengths differ per sample, so does the target's offset."""
    fam, spec = TINY_FAMILIES["z_image"], PROPOSED["z_image"]
    model = fam.build(0)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 1, 8, 16, generator=g)  # 4 x 8 = 32 tokens
    conds = torch.randn(2, 4, 1, 4, 4, generator=g)  # 2 x 2 = 4 tokens -> 32 with padding
    caps = [[torch.randn(40, 32, generator=g), torch.randn(5, 32, generator=g)],  # 64 + 32
            [torch.randn(5, 32, generator=g), torch.randn(3, 32, generator=g)]]  # 32 + 32
    expected_layers, expected_refiner = [64 + 32 + 32, 32 + 32 + 32], [32, 32]
    n = 32
    outs: dict[str, Any] = {}
    call: dict[str, Any] = {}
    model.register_forward_pre_hook(lambda m, a, k: call.update(_bind(m, a, k)), with_kwargs=True)
    model.layers[1].register_forward_hook(lambda m, a, o: outs.__setitem__("layers", o))
    model.noise_refiner[0].register_forward_hook(lambda m, a, o: outs.__setitem__("refiner", o))
    model.noise_refiner[0].register_forward_pre_hook(lambda m, a: outs.__setitem__("refiner_in", a[0]))
    capture = BlockCapture(model, spec, [1])
    capture.attach()
    capture.arm(n)

    def run(tg: Tensor) -> Tensor:
        out = model(x=[[conds[b], tg[b]] for b in range(2)], t=torch.full((2,), 0.3), cap_feats=caps,
                    siglip_feats=[None, None], image_noise_mask=[[0, 1], [0, 1]], return_dict=False)[0]
        return torch.stack(out)

    pred = run(target)
    assert pred.shape == (2, 4, 1, 8, 16)
    got = capture.take(1)
    capture.detach()
    want = torch.stack([outs["layers"][b, o: o + n] for b, o in enumerate(expected_layers)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(_z_image_layers(outs["layers"], n, call), want, rtol=0, atol=0)
    refiner = _z_image_refiner(outs["refiner"], n, call)
    torch.testing.assert_close(refiner, torch.stack([outs["refiner"][b, o: o + n]
                                                     for b, o in enumerate(expected_refiner)]), rtol=0, atol=0)
    # the selected tokens are the target's: perturbing one target latent changes one refiner input token
    before = outs["refiner_in"].detach().clone()
    with torch.no_grad():
        bumped = target.clone()
        bumped[:, :, :, 2, 3] += 10.0
        run(bumped)
    changed = torch.nonzero((outs["refiner_in"] - before).abs().amax(dim=(0, 2)) > 1e-6).flatten().tolist()
    assert changed == [32 + (2 // 2) * 8 + 3 // 2]


def _flux3_unpatchify() -> Callable[[Tensor], Tensor]:
    """`Flux3DecodeStep._unpatchify_latents`, compiled from the diffusers file (the modular pipeline itself
    cannot be imported without `transformers`)."""
    path = importlib.util.find_spec("diffusers.modular_pipelines.flux3.decoders").origin
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Flux3DecodeStep")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_unpatchify_latents")
    fn.decorator_list = []
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), namespace)
    return namespace["_unpatchify_latents"]


def test_image_latent_formats_match_the_pipelines():
    """Training space -> what `vae.decode` takes, as each pipeline writes it (source lines in the report)."""
    z = torch.randn(2, 16, 4, 6)
    # dit: DiTPipeline `1 / vae.config.scaling_factor * latents` (sd-vae-ft-ema/mse AutoencoderKL)
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215))
    torch.testing.assert_close(to_raw_latents(z, "kl", vae), 1 / 0.18215 * z)
    # z_image: ZImagePipeline `latents / sf + shift` (FLUX.1 AutoencoderKL)
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.3611, shift_factor=0.1159))
    torch.testing.assert_close(to_raw_latents(z, "kl", vae), z / 0.3611 + 0.1159)
    # flux3: Flux3DecodeStep: z * sqrt(bn.running_var + eps) + bn.running_mean, then unpatchify 2x2
    bn = nn.BatchNorm2d(16, eps=1e-4)
    bn.running_mean.copy_(torch.linspace(-1, 1, 16))
    bn.running_var.copy_(torch.linspace(0.5, 2, 16))
    vae = SimpleNamespace(bn=bn, config=SimpleNamespace(batch_norm_eps=1e-4))
    std, mean = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4), bn.running_mean.view(1, -1, 1, 1)
    want = _flux3_unpatchify()(z * std + mean)
    torch.testing.assert_close(to_raw_latents(z, "flux2", vae), want)
    assert want.shape == (2, 4, 8, 12)


def test_qwenimage_latents_are_per_channel_and_5d():
    """QwenImagePipeline: unpack, x / (1 / latents_std) + latents_mean on (B, C, 1, h, w), then
    AutoencoderKLQwenImage.decode(...)[0][:, :, 0]; the VAE refuses (B, C, h, w)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.5, 2.0, 1.0]).eval()
    z = torch.randn(2, 4, 4, 6)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    want = z.unsqueeze(2) / std + mean  # pipeline_qwenimage.py L705-713
    raw = to_raw_latents(z, "qwenimage", vae)  # the shipped "qwenimage" format
    torch.testing.assert_close(raw, want)
    with torch.no_grad():
        assert vae.decode(raw).sample.shape == (2, 3, 1, 32, 48)
        with pytest.raises(ValueError):
            vae.decode(raw[:, :, 0])


@pytest.mark.parametrize("family", VIDEO)
def test_video_vae_facts(family: str):
    """Tiny real VAEs of the two video families: ratios, shapes, 1 + r*n frames only, and the pipelines'
    de-normalisation (= decoders' "kl" transform)."""
    vae, facts = tiny_video_vae(family).eval(), VIDEO_VAE_FACTS[family]
    assert type(vae).__name__ == facts.vae_class == VIDEO_FACTS[family].vae.split(" ")[0]
    r, s = vae_ratios(vae)
    assert (r, s) == (facts.temporal, facts.tiny_spatial)
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, 1 + 2 * r, 32, 48) * 2 - 1).latent_dist.mean
        assert z.shape == (1, TINY_VIDEO_FAMILIES[family].latent_channels, 3, 32 // s, 48 // s)
        assert vae.decode(z).sample.shape == (1, 3, 1 + 2 * r, 32, 48)
        with pytest.raises(RuntimeError):
            vae.encode(torch.zeros(1, 3, 2, 16, 16))  # a ragged tail is not dropped
    x = normalize_latents(vae, torch.randn(2, z.shape[1], 2, 3, 4))
    if family == "hunyuan_video15":
        want = x / vae.config.scaling_factor  # pipeline_hunyuan_video1_5.py L825
    else:  # LTX2Pipeline._denormalize_latents
        mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
        want = x * std / vae.config.scaling_factor + mean
    torch.testing.assert_close(denormalize_latents(vae, x), want)
    torch.testing.assert_close(to_raw_latents(x, "kl", vae), want)


def test_hunyuan_video15_vae_needs_slicing_for_batches():
    """diffusers 0.42.1: AutoencoderKLHunyuanVideo15's mid-block attention passes a (B, L, L) mask to
    SDPA with (B, 1, L, C) queries; a batch of 2 fails, one sample at a time (slicing) works. When this
    test fails, the bug is fixed (PR #13133) and `tiny_video_vae` no longer needs `enable_slicing`."""
    vae = tiny_video_vae("hunyuan_video15").eval()
    assert vae.use_slicing
    with torch.no_grad():
        assert vae.decode(torch.randn(2, 4, 2, 2, 2)).sample.shape == (2, 3, 5, 16, 16)
        vae.disable_slicing()
        with pytest.raises(RuntimeError, match="broadcast"):
            vae.decode(torch.randn(2, 4, 2, 2, 2))


@pytest.mark.parametrize("family", VIDEO)
def test_video_facts_match_the_built_model(family: str):
    fam, facts = TINY_VIDEO_FAMILIES[family], VIDEO_FACTS[family]
    model = fam.build()
    assert type(model).__name__ == facts.model_class
    lists = {n: len(m) for n, m in model.named_children() if isinstance(m, nn.ModuleList)}
    assert lists == dict(facts.block_lists) and facts.align_blocks == PROPOSED[family].blocks[0].attr
    assert facts.block_output == "tuple[0]" and PROPOSED[family].blocks[0].output == 0
    assert facts.to_frames.startswith("out[0]")


@pytest.mark.parametrize("family", IMAGE + VIDEO)
def test_trains_with_the_proposed_entry(family: str, repa_options: dict):
    """Two steps of RepaCallback with the proposed Family object (a declared family, no edit to
    FAMILIES) on the last block: the projector is fed (B, N, D) image tokens (per frame for video) on
    the latent grid and learns. (decoder=pixels: the latent format is not read)."""
    from helpers import Recorder, TinyFlow, TinyVideoFlow, loader, trainer, video_loader
    from lightning_repa import RepaCallback
    import lightning as L

    spec = PROPOSED[family]
    video = family in VIDEO
    module = TinyVideoFlow(family) if video else TinyFlow(family)
    n_blocks = len(spec.block_modules(module.transformer))
    repa = RepaCallback(family=spec, block_index=n_blocks - 1, lam=1.0, **repa_options)
    record = Recorder(repa)
    L.seed_everything(0)
    data = video_loader(family) if video else loader(family, **({"hw": (8, 8), "image_hw": (64, 64)} if family == "dit"
                                                               else {}))
    trainer(2, [repa, record]).fit(module, data)
    size = (3, 4, 8) if video else ((8, 8) if family == "dit" else (8, 16))
    grid = _tiny(family).token_grid(*size)
    student = record.inputs[0]["student"]
    if video:
        assert student.shape == (2, grid[0], grid[1] * grid[2], 32) and record.inputs[0]["grid_s"] == grid[1:]
    else:
        assert student.shape == (2, grid[0] * grid[1], 32) and record.inputs[0]["grid_s"] == grid
    assert len(record.inputs) == 2
    assert all(not torch.equal(v, record.initial[k]) for k, v in module.repa_projector.state_dict().items())


@pytest.mark.parametrize("family", quick(IMAGE + VIDEO, {"dit", "ltx2"}))  # an image and a video DiT
def test_gradient_checkpointing_keeps_the_alignment_gradient(family: str, repa_options: dict):
    """As tests/test_reliability.py, with the proposed entry: the denoiser's first-step gradients with REPA
    on block 1 are the same under reentrant, non-reentrant or no checkpointing, and differ from lam 0."""
    import functools

    import lightning as L
    from torch.utils.checkpoint import checkpoint

    from helpers import TinyFlow, TinyVideoFlow, loader, trainer, video_loader
    from lightning_repa import RepaCallback

    spec = PROPOSED[family]
    video = family in VIDEO

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                self.grads = {n: p.grad.clone() for n, p in pl_module.transformer.named_parameters()
                              if p.grad is not None}

    def grads(mode: str, lam: float) -> dict[str, Tensor]:
        module = TinyVideoFlow(family) if video else TinyFlow(family)
        if mode == "reentrant":
            module.transformer.enable_gradient_checkpointing(
                gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=True))
        elif mode == "non_reentrant":
            module.transformer.enable_gradient_checkpointing()
        record = Grads()
        L.seed_everything(0)
        data = video_loader(family) if video else loader(family, **({"hw": (8, 8), "image_hw": (64, 64)}
                                                                    if family == "dit" else {}))
        trainer(1, [RepaCallback(family=spec, block_index=1, lam=lam, **repa_options), record]).fit(module, data)
        return record.grads

    plain = grads("none", 1.0)
    for mode in ("reentrant", "non_reentrant"):
        got = grads(mode, 1.0)
        # the parameters the class leaves out of the prediction (`_dead`) get a zero gradient, not None,
        # under a reentrant checkpoint (its backward hands zeros for the unused block outputs)
        assert all(not got[n].any() for n in got.keys() - plain.keys()) and plain.keys() <= got.keys(), mode
        for name in plain:
            torch.testing.assert_close(got[name], plain[name], rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")
    without = grads("reentrant", 0.0)
    assert any(not torch.allclose(without[n], plain[n]) for n in plain), "lam 0 must differ from lam 1"
