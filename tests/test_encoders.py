"""Tests of lightning_repa.encoders: checkpoint formats, token extraction, hub failure, iREPA z-score.

Reference values are computed here independently of the module: the official
DINOv2 key layout is written by hand, positional embeddings are resampled with
F.interpolate directly, the encoder input is built by hand, and the z-score is
computed with numpy.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_repa.encoders import (
    ENCODER_ALIASES,
    FrozenEncoder,
    load_encoder,
    spatial_zscore,
)

D = 384  # ViT-S width
PATCH = 14
GRID_518 = 37  # the official DINOv2 release is at 518 px: 37 x 37 patches
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- official-format checkpoints


def official_keys(depth: int, registers: bool) -> set[str]:
    """Key names of a facebookresearch/dinov2 ViT-S/B/L release file (hub models use block_chunks=0)."""
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"norm.weight", "norm.bias"}
    if registers:
        keys.add("register_tokens")
    per_block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias", "ls2.gamma",
    ]
    keys |= {f"blocks.{i}.{name}" for i in range(depth) for name in per_block}
    return keys


def random_timm_state(timm_name: str, seed: int) -> dict[str, Tensor]:
    """A timm DINOv2 state dict at 518 px with every tensor random (LayerScale and norms far from init)."""
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=518, device="meta")  # shapes
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        noise = torch.randn(v.shape, generator=g) * 0.1
        out[k] = (1.0 + noise) if re.search(r"norm\d?\.weight$", k) else noise
    return out


def timm_to_official(sd: dict[str, Tensor], registers: bool, seed: int) -> dict[str, Tensor]:
    """Inverse of timm's _convert_dinov2: the layout of dinov2_vits14[_reg4]_pretrain.pth.

    Official register models keep a CLS position in pos_embed, (1, 1 + 37*37, D);
    timm folds it into cls_token. Here the CLS position is random and cls_token is
    chosen so that timm's fold gives back a known value.
    """
    out = {"mask_token": torch.zeros(1, D)}
    pos_cls = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(seed)) * 0.1
    for k, v in sd.items():
        if registers and k == "reg_token":
            out["register_tokens"] = v.clone()
        elif registers and k == "pos_embed":  # timm (1, 1369, D) -> official (1, 1370, D)
            out["pos_embed"] = torch.cat([pos_cls, v], dim=1)
        elif registers and k == "cls_token":
            out["cls_token"] = v.clone()
        else:
            out[k] = v.clone()
    return out


def resample_grid(pos: Tensor, old: int, new: tuple[int, int]) -> Tensor:
    """(1, old*old, D) -> (1, new_h*new_w, D), bicubic with antialias, computed directly with F.interpolate."""
    grid = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)  # (1, h*w, D)


def expected_timm_state(official: dict[str, Tensor], registers: bool, grid: tuple[int, int]) -> dict[str, Tensor]:
    """What a timm ViT at `grid` must hold after loading `official`."""
    out = {k: v for k, v in official.items() if k not in ("mask_token", "register_tokens", "pos_embed")}
    pos = official["pos_embed"]  # (1, 1 + 37*37, D) in both official variants
    patch_pos = resample_grid(pos[:, 1:], GRID_518, grid)
    if registers:  # no_embed_class: CLS position folded into cls_token, registers without position
        out["cls_token"] = official["cls_token"] + pos[:, :1]
        out["reg_token"] = official["register_tokens"]
        out["pos_embed"] = patch_pos
    else:
        out["pos_embed"] = torch.cat([pos[:, :1], patch_pos], dim=1)
    return out


@pytest.fixture(scope="module")
def official_plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    sd = timm_to_official(random_timm_state("vit_small_patch14_dinov2", seed=1), registers=False, seed=2)
    assert set(sd) == official_keys(depth=12, registers=False)
    assert sd["pos_embed"].shape == (1, 1 + GRID_518**2, D)
    path = tmp_path_factory.mktemp("ckpt") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def official_reg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    sd = timm_to_official(random_timm_state("vit_small_patch14_reg4_dinov2", seed=3), registers=True, seed=4)
    assert set(sd) == official_keys(depth=12, registers=True)
    assert sd["pos_embed"].shape == (1, 1 + GRID_518**2, D)
    assert sd["register_tokens"].shape == (1, 4, D)
    path = tmp_path_factory.mktemp("ckpt") / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(sd, path)
    return path, sd


def assert_state_equal(model: nn.Module, expected: dict[str, Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        if k == "pos_embed" or k == "cls_token":  # interpolated / summed: float rounding only
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
        else:
            assert torch.equal(got[k], v), k


def reference_tokens(timm_name: str, state: dict[str, Tensor], image_size: int, images: Tensor,
                     grid: tuple[int, int], prefix: int) -> Tensor:
    """Patch tokens computed by hand: resize, clamp, normalise, forward_features, drop `prefix` tokens."""
    ref = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, img_size=image_size,
                            device="meta")
    ref.load_state_dict(state, strict=True, assign=True)
    ref.eval()
    size = (grid[0] * PATCH, grid[1] * PATCH)
    x = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        return ref.forward_features(x)[:, prefix:]


# --------------------------------------------------------------------------- loading the official format


def test_aliases_map_to_timm_dinov2_models() -> None:
    assert ENCODER_ALIASES["dinov2_vits14"] == "vit_small_patch14_dinov2"
    assert ENCODER_ALIASES["dinov2_vitg14"] == "vit_giant_patch14_dinov2"
    assert ENCODER_ALIASES["dinov2_vits14_reg"] == "vit_small_patch14_reg4_dinov2"
    assert ENCODER_ALIASES["dinov2_vitl14_reg"] == "vit_large_patch14_reg4_dinov2"
    assert len(ENCODER_ALIASES) == 8
    assert all(timm.models.is_model(v) for v in ENCODER_ALIASES.values())


def test_official_checkpoint_loads_and_matches_hand_computation(official_plain) -> None:
    path, official = official_plain
    enc = load_encoder("dinov2_vits14", image_size=224, checkpoint=str(path))

    assert (enc.embed_dim, enc.patch_size, enc.num_prefix_tokens) == (D, PATCH, 1)
    expected = expected_timm_state(official, registers=False, grid=(16, 16))
    assert_state_equal(enc.model, expected)
    assert torch.equal(enc.model.patch_embed.proj.weight, official["patch_embed.proj.weight"])
    assert torch.equal(enc.model.blocks[7].ls2.gamma, official["blocks.7.ls2.gamma"])
    # the resampled position embedding is also what timm's own helper gives
    timm_pos = timm.layers.resample_abs_pos_embed(official["pos_embed"], new_size=[16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(enc.model.pos_embed, timm_pos, rtol=0, atol=1e-6)

    torch.manual_seed(0)
    square = torch.rand(1, 3, 96, 96)
    out = enc(square)
    assert out.shape == (1, 256, D)
    ref = reference_tokens("vit_small_patch14_dinov2", expected, 224, square, (16, 16), prefix=1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

    wide = torch.rand(1, 3, 64, 128)  # 2:1
    grid = enc.grid_for(64, 128)
    assert grid == (11, 23)
    out = enc(wide)
    assert out.shape == (1, grid[0] * grid[1], D)  # values on non-square grids: see the register test


def test_register_checkpoint_drops_cls_and_register_tokens(official_reg) -> None:
    path, official = official_reg
    enc = load_encoder("dinov2_vits14_reg", image_size=56, checkpoint=path)

    assert enc.num_prefix_tokens == 5  # CLS + 4 registers
    expected = expected_timm_state(official, registers=True, grid=(4, 4))
    assert_state_equal(enc.model, expected)
    assert torch.equal(enc.model.reg_token, official["register_tokens"])

    torch.manual_seed(1)
    for images in (torch.rand(2, 3, 40, 40), torch.rand(1, 3, 60, 30)):  # square and 1:2 (tall)
        grid = enc.grid_for(*images.shape[-2:])
        out = enc(images)
        assert out.shape == (images.shape[0], grid[0] * grid[1], D)
        ref = reference_tokens("vit_small_patch14_reg4_dinov2", expected, 56, images, grid, prefix=5)
        assert ref.shape == out.shape
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert enc.grid_for(40, 40) == (4, 4) and enc.grid_for(60, 30) == (6, 3)


def test_safetensors_and_training_checkpoint_formats(official_plain, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path, official = official_plain
    expected = expected_timm_state(official, registers=False, grid=(4, 4))

    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in official.items()}, str(st))
    assert_state_equal(load_encoder("dinov2_vits14", image_size=56, checkpoint=st).model, expected)

    # DINOv2 training checkpoint: {"teacher": {"backbone.blocks.<chunk>.<i>....", heads...}}, plus counters
    chunked = {}
    for k, v in official.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        name = f"blocks.{int(m.group(1)) // 3}.{m.group(1)}.{m.group(2)}" if m else k
        chunked[f"backbone.{name}"] = v
    chunked["dino_head.mlp.0.weight"] = torch.randn(8, D)
    teacher = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": chunked, "iteration": 10}, teacher)
    assert_state_equal(load_encoder("dinov2_vits14", image_size=56, checkpoint=teacher).model, expected)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": dict(official), "epoch": 3}, wrapped)
    assert_state_equal(load_encoder("dinov2_vits14", image_size=56, checkpoint=wrapped).model, expected)


# --------------------------------------------------------------------------- checkpoint errors


def test_wrong_keys_list_missing_and_unexpected(official_plain, tmp_path: Path) -> None:
    _, official = official_plain
    bad = dict(official)
    bad["blocks.0.attn.qkv_renamed.weight"] = bad.pop("blocks.0.attn.qkv.weight")
    del bad["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as info:
        load_encoder("dinov2_vits14", image_size=56, checkpoint=path)
    msg = str(info.value)
    assert "encoder_checkpoint" in msg and str(path) in msg
    assert "blocks.0.attn.qkv.weight" in msg and "blocks.1.mlp.fc2.bias" in msg  # missing
    assert "blocks.0.attn.qkv_renamed.weight" in msg  # unexpected
    assert re.search(r"missing keys 2\b", msg) and re.search(r"unexpected keys 1\b", msg)


def test_register_mismatch_suggests_the_other_variant(official_reg) -> None:
    path, _ = official_reg
    with pytest.raises(ValueError, match=r"(?s)encoder_checkpoint.*has register tokens.*'dinov2_vits14_reg'"):
        load_encoder("dinov2_vits14", image_size=56, checkpoint=path)


def test_plain_checkpoint_in_register_model_says_so(official_plain) -> None:
    path, _ = official_plain
    with pytest.raises(ValueError, match=r"(?s)encoder_checkpoint.*no register tokens.*'dinov2_vits14'"):
        load_encoder("dinov2_vits14_reg", image_size=56, checkpoint=path)


def test_wrong_model_size_is_a_value_error(official_plain) -> None:
    path, _ = official_plain
    with pytest.raises(ValueError, match=r"(?s)encoder_checkpoint.*other shapes.*`encoder`"):
        load_encoder("vit_base_patch14_dinov2", image_size=28, checkpoint=path)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="encoder_checkpoint"):
        load_encoder("dinov2_vits14", image_size=56, checkpoint=tmp_path / "nope.pth")


def test_unknown_names_and_non_vits() -> None:
    with pytest.raises(ValueError, match=r"(?s)`encoder`.*'dinov2_vits14'"):
        load_encoder("dinov2_vits16")
    with pytest.raises(ValueError, match="`encoder`"):
        load_encoder("resnet18", image_size=56)


@pytest.mark.parametrize("size, options", [(230, ("224", "238")), (256, ("252", "266")), (10, ("14",))])
def test_image_size_not_multiple_of_patch(size: int, options: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="encoder_image_size") as info:
        load_encoder("dinov2_vits14", image_size=size)
    assert all(o in str(info.value) for o in options)
    with pytest.raises(ValueError, match="encoder_image_size"):
        load_encoder("dinov2_vits14", image_size=0)


# --------------------------------------------------------------------------- the hub


def _empty_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))  # read at import: patch the value too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only the environment variable says offline
    return hub


def test_offline_without_checkpoint_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    _empty_hub_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        load_encoder("dinov2_vits14")
    elapsed = time.perf_counter() - start
    msg = str(info.value)
    assert "encoder_checkpoint=/path/to/weights.pth" in msg and "dinov2_vits14" in msg
    assert "could not be downloaded" in msg
    assert info.value.__cause__ is not None
    assert elapsed < 10, elapsed  # timm + huggingface_hub alone retry for ~50 s
    assert constants.HF_HUB_OFFLINE is False  # the temporary offline switch was undone


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    _empty_hub_cache(monkeypatch, tmp_path)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a local port with nothing listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="encoder_checkpoint"):
        load_encoder("dinov2_vits14", image_size=56)
    assert time.perf_counter() - start < 10


def test_offline_still_uses_the_local_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    hub = _empty_hub_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    timm_sd = random_timm_state("vit_small_patch14_dinov2", seed=5)  # timm layout, 518 px
    repo = hub / "models--timm--vit_small_patch14_dinov2.lvd142m"
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(timm_sd, str(repo / "snapshots" / commit / "model.safetensors"))

    enc = load_encoder("dinov2_vits14", image_size=56)
    expected = dict(timm_sd)
    pos = timm_sd["pos_embed"]
    expected["pos_embed"] = torch.cat([pos[:, :1], resample_grid(pos[:, 1:], GRID_518, (4, 4))], dim=1)
    assert_state_equal(enc.model, expected)


# --------------------------------------------------------------------------- the module


@pytest.fixture(scope="module")
def small_encoder() -> FrozenEncoder:
    # a 2-block ViT-S/14 with random weights: the wrapper does not depend on depth
    model = timm.create_model("vit_small_patch14_dinov2", depth=2, num_classes=0, dynamic_img_size=True, img_size=56)
    return FrozenEncoder(model, image_size=56)


def test_grid_for_square_and_non_square() -> None:
    model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, dynamic_img_size=True, img_size=224,
                              device="meta")
    enc = FrozenEncoder(model, image_size=224)
    assert enc.grid_for(224, 224) == (16, 16)
    assert enc.grid_for(512, 512) == (16, 16)
    assert enc.grid_for(256, 512) == (11, 23)
    assert enc.grid_for(512, 256) == (23, 11)
    assert enc.grid_for(1, 10_000) == (1, 1600)  # never a zero side
    for h, w in [(256, 512), (480, 640), (720, 1280), (100, 300)]:
        gh, gw = enc.grid_for(h, w)
        assert abs(gh * gw - 256) <= 0.1 * 256
        assert gh == max(1, round((256 * h / w) ** 0.5)) and gw == max(1, round((256 * w / h) ** 0.5))


@pytest.mark.parametrize("hw", [(32, 32), (64, 128), (128, 64), (90, 160), (300, 100), (17, 400)])
def test_encoder_input_keeps_aspect_within_one_patch(small_encoder: FrozenEncoder, hw: tuple[int, int]) -> None:
    seen: list[tuple[int, int]] = []
    handle = small_encoder.model.patch_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2:]))
    try:
        out = small_encoder(torch.rand(1, 3, *hw))
    finally:
        handle.remove()
    h_in, w_in = seen[0]
    h, w = hw
    assert h_in % PATCH == 0 and w_in % PATCH == 0
    assert out.shape == (1, (h_in // PATCH) * (w_in // PATCH), D)
    if h <= w:  # the error of the shorter side, measured in pixels of the encoder input
        assert abs(h_in - w_in * h / w) <= PATCH
    else:
        assert abs(w_in - h_in * w / h) <= PATCH


def test_frozen_eval_no_grad_and_grey_input(small_encoder: FrozenEncoder) -> None:
    parent = nn.Sequential(small_encoder, nn.Identity())
    parent.train()
    assert not small_encoder.training and not small_encoder.model.training
    assert not any(m.training for m in small_encoder.modules())
    assert not any(p.requires_grad for p in small_encoder.parameters())

    grey = torch.rand(2, 1, 42, 42, requires_grad=True)
    out = small_encoder(grey)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, small_encoder(grey.detach().repeat(1, 3, 1, 1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        small_encoder(torch.rand(1, 4, 28, 28))
    assert small_encoder.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert small_encoder.std.tolist() == pytest.approx([0.229, 0.224, 0.225])


# --------------------------------------------------------------------------- iREPA


def numpy_zscore(f: np.ndarray, alpha: float) -> np.ndarray:
    return (f - alpha * f.mean(axis=-2, keepdims=True)) / (f.std(axis=-2, ddof=1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_spatial_zscore_matches_numpy(alpha: float) -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(loc=3.0, scale=2.0, size=(2, 3, 10, 5))  # (B, T, N, D)
    got = spatial_zscore(torch.from_numpy(f), alpha=alpha).numpy()
    np.testing.assert_allclose(got, numpy_zscore(f, alpha), rtol=1e-10, atol=1e-10)
    if alpha == 1.0:  # a plain per-channel z-score over tokens
        np.testing.assert_allclose(got.mean(axis=-2), 0.0, atol=1e-10)
        np.testing.assert_allclose(got.std(axis=-2, ddof=1), 1.0, atol=1e-5)
    if alpha == 0.0:  # only rescaled: the token mean keeps its sign and is mean/std
        np.testing.assert_allclose(got.mean(axis=-2), f.mean(axis=-2) / (f.std(axis=-2, ddof=1) + 1e-6))


def test_spatial_zscore_default_alpha_and_errors() -> None:
    f = torch.randn(4, 16, 8)
    torch.testing.assert_close(spatial_zscore(f), torch.from_numpy(numpy_zscore(f.double().numpy(), 0.6)).float())
    with pytest.raises(ValueError, match="at least 2 tokens"):
        spatial_zscore(torch.randn(2, 1, 8))


def test_other_timm_vit_with_non_persistent_buffers(tmp_path: Path) -> None:
    """EVA-02 keeps rotary tables and k_bias in non-persistent buffers that no checkpoint carries."""
    saved = timm.create_model("eva02_tiny_patch14_224", num_classes=0, img_size=224).state_dict()
    path = tmp_path / "eva.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in saved.items()}, path)  # fp16 file

    enc = load_encoder("eva02_tiny_patch14_224", image_size=56, checkpoint=path)
    tensors = list(enc.model.parameters()) + list(enc.model.buffers())
    assert not any(t.is_meta for t in tensors) and all(t.dtype == torch.float32 for t in tensors)
    weight = enc.model.blocks[3].mlp.fc2.weight
    assert torch.equal(weight, saved["blocks.3.mlp.fc2.weight"].half().float())
    out = enc(torch.rand(1, 3, 30, 60))
    assert out.shape == (1, 3 * 6, enc.embed_dim) and enc.grid_for(30, 60) == (3, 6)
    assert torch.isfinite(out).all()


def test_classification_head_in_the_file_is_dropped_other_extra_keys_are_not(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10, img_size=518)
    path = tmp_path / "classifier.pth"
    torch.save(model.state_dict(), path)
    encoder = load_encoder("dinov2_vits14", image_size=56, checkpoint=path)
    torch.testing.assert_close(encoder.model.patch_embed.proj.weight, model.patch_embed.proj.weight)
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(ValueError, match="extra.weight"):
        load_encoder("dinov2_vits14", image_size=56, checkpoint=path)
