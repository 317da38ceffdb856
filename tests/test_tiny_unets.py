"""The tiny UNets of `lightning_repa.testing.tiny_models` (sd15, sdxl, kolors): layout, mid-block grid,
added conditioning, gradients. The downsampling factor is counted here from the built model,
not taken from the family entry."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_repa.testing.tiny_models import TEXT_DIM, TINY_FAMILIES

UNETS = ("sd15", "sdxl", "kolors")
DOWNSAMPLES = {"sd15": 3, "sdxl": 2, "kolors": 2}  # the real models': SD1.5 64 -> 8, SDXL 128 -> 32
HW = (16, 32)  # non-square, a multiple of 8


def _downsamples(model: nn.Module) -> int:
    """Down blocks that halve the resolution, counted twice: from the config and from the modules."""
    types = model.config.down_block_types
    from_config = sum(i != len(types) - 1 for i in range(len(types)))  # every block but the last
    from_modules = sum(getattr(b, "downsamplers", None) is not None for b in model.down_blocks)
    assert from_config == from_modules
    return from_modules


def _run(name: str, hw: tuple[int, int] = HW) -> tuple[nn.Module, Tensor, Tensor, dict[str, Any]]:
    """(model, x_t, prediction, what the hooks saw: the mid block's output and the UNet's kwargs)."""
    fam = TINY_FAMILIES[name]
    model = fam.build(seed=0)
    seen: dict[str, Any] = {}
    model.mid_block.register_forward_hook(lambda m, args, out: seen.update(mid=out))
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs=kwargs), with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, fam.latent_channels, *hw, generator=g)  # (B, C, h, w)
    pred = fam.forward(model, x_t, torch.rand(2, generator=g), fam.make_cond(2, seed=0))
    return model, x_t, pred, seen


@pytest.mark.parametrize("name", UNETS)
def test_layout(name: str) -> None:
    fam = TINY_FAMILIES[name]
    model = fam.build()
    assert type(model).__name__ == "UNet2DConditionModel"
    assert fam.latent_channels == model.config.in_channels == model.config.out_channels == 4
    assert _downsamples(model) == DOWNSAMPLES[name]
    assert fam.patch * fam.downsample == 2 ** DOWNSAMPLES[name]
    cross_attn = ["CrossAttn" in t for t in model.config.down_block_types]
    assert cross_attn == ([True] * 3 + [False] if name == "sd15" else [False, True, True])


@pytest.mark.parametrize("name", UNETS)
def test_forward_mid_block_and_gradients(name: str) -> None:
    model, x_t, pred, seen = _run(name)
    assert pred.shape == x_t.shape
    assert torch.isfinite(pred).all()

    f = 2 ** _downsamples(model)
    h, w = HW
    assert seen["mid"].shape == (2, model.config.block_out_channels[-1], h // f, w // f)
    assert TINY_FAMILIES[name].token_grid(h, w) == (h // f, w // f)

    pred.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize("name", UNETS)
def test_added_conditioning(name: str) -> None:
    model, _, _, seen = _run(name)
    kwargs, config = seen["kwargs"], model.config
    assert kwargs["encoder_hidden_states"].shape == (2, 5, TEXT_DIM)
    if name == "sd15":
        assert config.addition_embed_type is None
        assert not kwargs["added_cond_kwargs"]
        return
    assert config.addition_embed_type == "text_time"
    added = kwargs["added_cond_kwargs"]
    assert set(added) == {"text_embeds", "time_ids"}
    pooled, time_ids = added["text_embeds"], added["time_ids"]  # (B, P), (B, 6)
    assert time_ids.shape == (2, 6)
    assert pooled.shape[0] == 2
    expected = pooled.shape[1] + time_ids.shape[1] * config.addition_time_embed_dim
    assert expected == config.projection_class_embeddings_input_dim == model.add_embedding.linear_1.in_features


def test_kolors_projects_its_text_inside_the_unet() -> None:
    sdxl, kolors = TINY_FAMILIES["sdxl"].build(), TINY_FAMILIES["kolors"].build()
    assert sdxl.encoder_hid_proj is None
    assert kolors.config.encoder_hid_dim_type == "text_proj"
    proj = kolors.encoder_hid_proj  # ChatGLM width -> cross-attention width (Kolors: 4096 -> 2048)
    assert (proj.in_features, proj.out_features) == (TEXT_DIM, kolors.config.cross_attention_dim)
    assert proj.out_features < proj.in_features
    attn2 = kolors.mid_block.attentions[0].transformer_blocks[0].attn2
    assert attn2.to_k.in_features == kolors.config.cross_attention_dim
    # the pooled text embedding keeps the text encoder's width, as Kolors' 4096 (5632 = 4096 + 6*256)
    pooled = TINY_FAMILIES["kolors"].make_cond(1)["text_embeds"]
    assert pooled.shape[1] == proj.in_features


@pytest.mark.parametrize("name", UNETS)
def test_deterministic(name: str) -> None:
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        a, b = (_run(name)[2] for _ in range(2))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(a, b)


def test_token_grid_refuses_latents_the_mid_block_cannot_tile() -> None:
    with pytest.raises(ValueError, match="multiples of 8, got 12x32"):
        TINY_FAMILIES["sd15"].token_grid(12, 32)
    assert TINY_FAMILIES["sdxl"].token_grid(12, 32) == (3, 8)
    assert TINY_FAMILIES["flux"].token_grid(8, 16) == (4, 8)  # DiTs: downsample 1


def test_demo_unet_trains_samples_and_reloads(tmp_path) -> None:
    import lightning as L

    from lightning_repa.demo.data import DigitsDataModule
    from lightning_repa.demo.unet import FlowMatchingUNet

    model = FlowMatchingUNet(channels=(16, 16, 32), head_dim=16)
    assert _downsamples(model.unet) == 2
    seen: dict[str, Tensor] = {}
    model.unet.mid_block.register_forward_hook(lambda m, args, out: seen.update(mid=out))
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, val_check_interval=2, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=8))
    assert seen["mid"].shape == (8, 32, 4, 4)  # 16x16 digits, two downsamples
    assert {"train/loss", "val/loss"} <= set(trainer.logged_metrics)

    grid = model.save_sample_grid(tmp_path / "grid.png", steps=2, per_class=1, guidance=2.0, scale=1, seed=0)
    assert grid.stat().st_size > 0
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    again = FlowMatchingUNet.load_from_checkpoint(ckpt)
    assert tuple(again.hparams.channels) == (16, 16, 32)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"image_size": 18}, "multiple of 4"), ({"channels": (32, 32)}, "channels"), ({"head_dim": 24}, "head_dim=24"),
     ({"time_sampling": "beta"}, "time_sampling"), ({"cfg_dropout": 1.0}, "cfg_dropout")],
)
def test_demo_unet_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    from lightning_repa.demo.unet import FlowMatchingUNet

    with pytest.raises(ValueError, match=match):
        FlowMatchingUNet(**kwargs)
