"""Tiny random denoisers of the image DiT families and the three UNet families, for tests,
notebooks and benchmarks.

Each entry of `TINY_FAMILIES` builds the real diffusers class with a tiny config (hidden
size 32, 3-4 transformer blocks, or UNets 8-32 channels wide; milliseconds per step on CPU)
and knows how to call it the way a diffusers training script does:

    fam = TINY_FAMILIES["flux"]
    model = fam.build(seed=0)
    x_t = torch.randn(2, fam.latent_channels, 8, 16)        # (B, C, h, w), training space
    cond = fam.make_cond(batch_size=2, seed=0)
    pred = fam.forward(model, x_t, torch.rand(2), cond)     # (B, C, h, w), same as x_t

Latents are always spatial (B, C, h, w), as training scripts cache them:
- flux, chroma: the unpacked VAE latent; `forward` packs 2x2 patches into tokens
  (`FluxPipeline._pack_latents`), so the token grid is (h/2, w/2).
- flux2: the already patchified and batch-normalised latent; one position is one token,
  so the token grid is (h, w).
- sd3, sana, pixart, hidream, auraflow, lumina2: the model patchifies with its own
  `patch_size`; the token grid is (h/p, w/p).
- dit (DiTTransformer2DModel, class-conditional, patch 2): (h/2, w/2); `class_labels` (B,) in the
  conditioning, timestep t * 1000 (DDPM scale, DiTPipeline), learned-sigma channels dropped. SQUARE
  latents only: the class unpatchifies as `height = width = sqrt(tokens)` (its blocks take any grid).
  `build` sets the label dropout to 0 (diffusers drops labels with the global RNG in train mode).
- flux3 (Flux3Transformer2DModel): like flux2, the latent is already 2x2-patchified (128 channels
  released, 16 tiny), one position is one token, grid (h, w); ids (t, h, w, l) with h, w halved
  (`image_rope_scale` 0.5). The tiny conditioning carries one reference image (the edit branch), so
  the joint blocks' image stream is [N image, 6 reference].
- qwenimage (QwenImageTransformer2DModel): `forward` packs 2x2 as Flux (config patch_size 2 is that
  packing; the model does not patchify), grid (h/2, w/2), `img_shapes` [(1, h/2, w/2)], timestep t
  (the model scales by 1000), a ragged text mask.
- z_image (ZImageTransformer2DModel): per-sample lists as ZImagePipeline: x [(C, 1, h, w)], t = 1 - t
  (1 = clean), captions = the valid rows of each padded caption; patch 2, grid (h/2, w/2).
- sd15, sdxl, kolors (`UNet2DConditionModel`): the U-REPA tap is `unet.mid_block`, whose
  output (B, C, h/f, w/f) is f = 2**(down blocks that downsample) times smaller than the
  latent: f = 8 for sd15 (3 of 4 down blocks halve), 4 for sdxl and kolors (2 of 3). Latent
  sides must be multiples of f (`token_grid` refuses others; the real UNets need the same).

`t` is the noise level in [0, 1] (flow matching sigma, 1 = pure noise); `forward` maps it
to each class's convention, as its pipeline does (x1000 for the UNets and dit too, or 1 - t for
lumina2 and z_image). The output is the raw model prediction (no sign flip; pixart's learned-sigma
channels are dropped).

The UNets' conditioning is flat like the others'; `forward` hands sdxl's and kolors'
`text_embeds` (pooled, (B, 32)) and `time_ids` ((B, 6): original size, crop, target size)
to the model as `added_cond_kwargs`, as StableDiffusionXLPipeline and KolorsPipeline do.
Kolors differs from SDXL in its text encoder: one ChatGLM3 (hidden 4096) instead of two CLIPs,
so its UNet projects `encoder_hidden_states` 4096 -> 2048 itself (`encoder_hid_dim_type=
"text_proj"`, `unet.encoder_hid_proj`) and its pooled `text_embeds` are 4096 wide
(`projection_class_embeddings_input_dim` 4096 + 6*256 = 5632, SDXL's 1280 + 6*256 = 2816).

Size limits of the tiny configs: sd3 and auraflow take token grids up to 16x16 (latents up
to 32x32, from `pos_embed_max_size`), hidream non-square latents up to h*w = 1024 (they are
zero-padded to `max_seq` = 256 tokens), lumina2 grids up to 64x64 (`axes_lens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import (
    AuraFlowTransformer2DModel,
    ChromaTransformer2DModel,
    DiTTransformer2DModel,
    Flux2Transformer2DModel,
    Flux3Transformer2DModel,
    FluxTransformer2DModel,
    HiDreamImageTransformer2DModel,
    Lumina2Transformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    ZImageTransformer2DModel,
)
from torch import Tensor, nn

Cond = dict[str, Tensor]

TEXT_LEN = 5  # L: text tokens per sample
TEXT_DIM = 32  # width of every random text embedding
HIDREAM_LLAMA_LAYERS = 4  # one llama3 layer per hidream block (2 double + 2 single)
# SDXL micro-conditioning: (original h, w, crop top, left, target h, w), the pipelines' default
# for 1024x1024 images; the tiny UNets embed each with `addition_time_embed_dim` sinusoids.
SDXL_TIME_IDS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)
DIT_CLASSES = 10  # tiny `num_embeds_ada_norm` (DiT-XL/2: 1000 ImageNet classes); label DIT_CLASSES = "no class"
FLUX3_IMAGE_ROPE_SCALE = 0.5  # Flux3PrepareLatentsStep(image_rope_scale=0.5): image (h, w) ids are halved
FLUX3_REFERENCE_GRID = (2, 3)  # the tiny flux3's reference image: a 2x3 token grid (an edit / image-to-image call)


class TinyBuilder:
    """What the tiny image and video families share: building the model and its conditioning.
    Subclasses are dataclasses with `model_class`, `config`, `cond_fn` and `post_init`."""

    def build(self, seed: int = 0) -> nn.Module:
        """The diffusers model with random weights from `seed`; the global RNG is untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class(**self.config)
            if self.post_init is not None:
                self.post_init(model)
            return model

    def make_cond(self, batch_size: int, seed: int = 0) -> Cond:
        """Random but deterministic conditioning (text embeddings, ids, masks, pooled embeddings)."""
        return self.cond_fn(batch_size, torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class TinyFamily(TinyBuilder):
    """A tiny config of one diffusers DiT or UNet class and how to run it on spatial latents."""

    name: str
    model_class: type[nn.Module]
    config: dict[str, Any] = field(repr=False)
    latent_channels: int  # C of the training-space latent (B, C, h, w)
    patch: int  # latent pixels per input token side (DiT patchify/packing; 1 for UNets)
    cond_fn: Callable[[int, torch.Generator], Cond] = field(repr=False)
    forward_fn: Callable[[nn.Module, Tensor, Tensor, Cond], Tensor] = field(repr=False)
    # Further spatial reduction between the input tokens and the captured block: 1 for DiTs,
    # 2**(down blocks that downsample) for a UNet's mid block. Token grid = h // (patch * downsample).
    downsample: int = 1
    # adjusts the built model (DiT: no label dropout inside the model, see `_no_label_dropout`)
    post_init: Callable[[nn.Module], None] | None = field(default=None, repr=False)

    def forward(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Prediction for noisy latents x_t (B, C, h, w) at noise levels t (B,) in [0, 1]."""
        return self.forward_fn(model, x_t, t, cond)

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """The (rows, cols) of the captured tokens for a latent of spatial size (h, w).

        Raises:
            ValueError: if h or w is not a multiple of `patch * downsample`.
        """
        f = self.patch * self.downsample
        if h % f or w % f:
            raise ValueError(f"{self.name}: latent sides must be multiples of {f}, got {h}x{w}")
        return h // f, w // f


# ---------------------------------------------------------------- conditioning


def _text(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g)


def _cond_flux(b: int, g: torch.Generator) -> Cond:
    return {
        "encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM),  # (B, L, 32)
        "pooled_projections": _text(g, b, TEXT_DIM),  # (B, 32)
        "txt_ids": torch.zeros(TEXT_LEN, 3),  # (L, 3)
    }


def _cond_chroma(b: int, g: torch.Generator) -> Cond:
    return {
        "encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM),  # (B, L, 32)
        "txt_ids": torch.zeros(TEXT_LEN, 3),  # (L, 3)
    }


def _cond_flux2(b: int, g: torch.Generator) -> Cond:
    # text position ids (t, h, w, l) = (0, 0, 0, l), as Flux2Pipeline._prepare_text_ids
    txt_ids = torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, TEXT_LEN)))  # (L, 4)
    return {"encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM), "txt_ids": txt_ids}


def _cond_text_pooled(b: int, g: torch.Generator) -> Cond:
    return {
        "encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM),  # (B, L, 32)
        "pooled_projections": _text(g, b, TEXT_DIM),  # (B, 32)
    }


def _cond_text(b: int, g: torch.Generator) -> Cond:
    return {"encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM)}  # (B, L, 32)


def _cond_hidream(b: int, g: torch.Generator) -> Cond:
    return {
        "encoder_hidden_states_t5": _text(g, b, TEXT_LEN, TEXT_DIM),  # (B, L, 32)
        "encoder_hidden_states_llama3": _text(g, HIDREAM_LLAMA_LAYERS, b, TEXT_LEN, TEXT_DIM),  # (4,B,L,32)
        "pooled_embeds": _text(g, b, TEXT_DIM),  # (B, 32)
    }


def _cond_lumina2(b: int, g: torch.Generator) -> Cond:
    # ragged captions: valid lengths 5, 3, 5, 3, ... (left-aligned, as tokenizers pad right)
    lengths = torch.tensor([TEXT_LEN - 2 * (i % 2) for i in range(b)])
    mask = torch.arange(TEXT_LEN)[None] < lengths[:, None]  # (B, L) bool
    return {"encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM), "encoder_attention_mask": mask}


def _cond_dit(b: int, g: torch.Generator) -> Cond:
    return {"class_labels": torch.randint(0, DIT_CLASSES, (b,), generator=g)}  # (B,) long, ImageNet-style


def _flux3_ids(gh: int, gw: int, l_coord: int = 0) -> Tensor:
    """(gh*gw, 4) ids (t, h, w, l) = (0, row/2, col/2, l), row-major, as flux3 `_prepare_image_ids`."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(gh), torch.arange(gw), torch.tensor([l_coord])).float()
    ids[:, 1:3] = ids[:, 1:3] * FLUX3_IMAGE_ROPE_SCALE
    return ids


def _cond_flux3(b: int, g: torch.Generator) -> Cond:
    rh, rw = FLUX3_REFERENCE_GRID
    return {
        "encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM),  # (B, L, 32): stacked Qwen3-VL states
        "txt_ids": torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, TEXT_LEN))).float(),  # (L, 4)
        # one reference image (the edit / image-to-image branch; text-to-image passes none and leaves the
        # `image_cond` embedder, modulations and mode blocks without gradient)
        "image_cond_hidden_states": _text(g, b, rh * rw, 16),  # (B, 6, 16): packed reference latent tokens
        "image_cond_ids": _flux3_ids(rh, rw, l_coord=-1),  # (6, 4): reference l = -1
    }


def _ragged_mask(b: int) -> Tensor:
    """(B, L) long text mask, valid lengths 5, 3, 5, 3, ... (right padding, as tokenizers pad)."""
    lengths = torch.tensor([TEXT_LEN - 2 * (i % 2) for i in range(b)])
    return (torch.arange(TEXT_LEN)[None] < lengths[:, None]).long()


def _cond_qwenimage(b: int, g: torch.Generator) -> Cond:
    # QwenImagePipeline passes `prompt_embeds_mask` (None when all ones)
    return {"encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM), "encoder_hidden_states_mask": _ragged_mask(b)}


def _cond_z_image(b: int, g: torch.Generator) -> Cond:
    # padded (B, L, 32) + mask; `forward` hands the transformer the per-sample valid rows, as
    # ZImagePipeline._encode_prompt does (`prompt_embeds[i][prompt_masks[i]]`)
    return {"encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM), "encoder_attention_mask": _ragged_mask(b).bool()}


def _cond_sdxl(b: int, g: torch.Generator) -> Cond:
    return {
        "encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM),  # (B, L, 32)
        "text_embeds": _text(g, b, TEXT_DIM),  # (B, 32): pooled CLIP-G (SDXL), last ChatGLM token (Kolors)
        "time_ids": torch.tensor(SDXL_TIME_IDS).expand(b, -1).clone(),  # (B, 6)
    }


# ---------------------------------------------------------------- forwards


def _grid_ids(gh: int, gw: int) -> Tensor:
    """(gh*gw, 3) position ids (0, row, col), row-major, as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(gh, gw, 3)
    ids[..., 1] = torch.arange(gh)[:, None]
    ids[..., 2] = torch.arange(gw)[None, :]
    return ids.reshape(gh * gw, 3)


def pack2x2(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), as FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack2x2(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), as FluxPipeline._unpack_latents."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def _forward_flux(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    h, w = x.shape[-2:]
    out = model(
        hidden_states=pack2x2(x),  # (B, N, 4C)
        img_ids=_grid_ids(h // 2, w // 2).to(x),  # (N, 3)
        timestep=t,  # the model multiplies by 1000
        return_dict=False,
        **cond,
    )[0]  # (B, N, 4C)
    return unpack2x2(out, h, w)


def _forward_flux2(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).transpose(1, 2)  # (B, N, C), as Flux2Pipeline._pack_latents
    img_ids = torch.cartesian_prod(*(torch.arange(n, device=x.device) for n in (1, h, w, 1)))  # (N, 4)
    out = model(hidden_states=tokens, img_ids=img_ids, timestep=t, return_dict=False, **cond)[0]  # (B, N, C)
    return out.transpose(1, 2).reshape(b, c, h, w)


def _forward_sd3_sana(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    return model(hidden_states=x, timestep=t * 1000, return_dict=False, **cond)[0]  # (B, C, h, w)


def _forward_pixart(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    out = model(hidden_states=x, timestep=t * 1000, return_dict=False, **cond)[0]  # (B, 2C, h, w)
    return out[:, : x.shape[1]]  # drop the learned-sigma channels


def _forward_hidream(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    b, c, h, w = x.shape
    p = model.config.patch_size
    out = model(hidden_states=x, timesteps=t * 1000, return_dict=False, **cond)[0]
    if not model.training or model.config.force_inference_output:
        return out  # already unpatchified: (B, C, h, w)
    # train mode: (B, C, S, p*p), S = (h/p)(w/p) tokens, or max_seq zero-padded ones if h != w
    out = out[:, :, : (h // p) * (w // p)].reshape(b, c, h // p, w // p, p, p)
    return out.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def _forward_auraflow(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    return model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]  # Timesteps(scale=1000)


def _forward_lumina2(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    # Lumina2Pipeline passes 1 - sigma (1 = clean) and negates the prediction; we keep it raw
    return model(hidden_states=x, timestep=1 - t, return_dict=False, **cond)[0]


def _forward_dit(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    h, w = x.shape[-2:]
    if h != w:  # the blocks take any grid (PatchEmbed recomputes its sin-cos table), the output does not
        raise ValueError(
            f"dit: DiTTransformer2DModel unpatchifies its output as a square (`height = width = "
            f"int(tokens ** 0.5)`, dit_transformer_2d.py L214), so latents must be square, got {h}x{w}"
        )
    out = model(hidden_states=x, timestep=t * 1000, class_labels=cond["class_labels"], return_dict=False)[0]
    return out[:, : x.shape[1]]  # (B, 2C, h, w): drop the learned-sigma channels, as DiTPipeline does


def _no_label_dropout(model: nn.Module) -> None:
    """DiT's label embedders drop labels in train mode with the *global* RNG (`LabelEmbedding.token_drop`,
    `torch.rand`, class_dropout_prob 0.1); the tiny model keeps the labels so that a forward is a pure
    function of its inputs. Drop labels in the training step instead (label `DIT_CLASSES` = no class)."""
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0


def _forward_flux3(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C), as Flux3PrepareLatentsStep (latents already packed 2x2)
    out = model(hidden_states=tokens, img_ids=_flux3_ids(h, w).to(x), timestep=t, return_dict=False, **cond)[0]
    return out.transpose(1, 2).reshape(b, c, h, w)  # Flux3UnpackLatentsStep


def _forward_qwenimage(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    b, _, h, w = x.shape
    out = model(
        hidden_states=pack2x2(x),  # (B, N, 4C), QwenImagePipeline._pack_latents (= Flux's)
        timestep=t,  # the pipeline passes timestep / 1000; the model's Timesteps(scale=1000) scales it back
        img_shapes=[[(1, h // 2, w // 2)]] * b,
        return_dict=False,
        **cond,
    )[0]
    return unpack2x2(out, h, w)


def _forward_z_image(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    caps = [e[m] for e, m in zip(cond["encoder_hidden_states"], cond["encoder_attention_mask"])]  # (L_i, 32) each
    # ZImagePipeline: per-sample list of (C, 1, h, w), t = (1000 - timestep) / 1000 = 1 - sigma (1 = clean),
    # the caption list positionally; it negates the prediction, we keep it raw
    out = model(list(x.unsqueeze(2).unbind(0)), 1 - t, caps, return_dict=False)[0]  # list of (C, 1, h, w)
    return torch.stack(out).squeeze(2)


def _forward_unet(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}  # sdxl, kolors: text_time
    return model(
        x,  # (B, C, h, w)
        t * 1000,  # DDPM-scale timesteps, as the DiTs' pipelines
        encoder_hidden_states=cond["encoder_hidden_states"],
        added_cond_kwargs=added or None,
        return_dict=False,
    )[0]  # (B, C, h, w)


# ---------------------------------------------------------------- families

_DIM = {"num_attention_heads": 2, "attention_head_dim": 16}  # hidden size 32

# SD1.5: CrossAttnDownBlock2D x3 + DownBlock2D, 3 downsamples, widths (320, 640, 1280, 1280),
# 2 resnets a block, cross-attention on the CLIP-L hidden states (768) directly.
_SD15 = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
    attention_head_dim=2,  # diffusers' misnomer: 2 heads (SD1.5: 8)
    cross_attention_dim=TEXT_DIM,
)
# SDXL: DownBlock2D, CrossAttnDownBlock2D x2, 2 downsamples, widths (320, 640, 1280), transformer
# depths (1, 2, 10) (the mid block repeats the last), linear projections, text_time conditioning on
# the pooled text embedding + 6 sinusoid-embedded `time_ids`.
_SDXL = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16, 32), norm_num_groups=4,
    attention_head_dim=(1, 2, 4),  # heads (SDXL: 5, 10, 20), 8 channels each
    transformer_layers_per_block=(1, 1, 2),  # SDXL (1, 2, 10)
    use_linear_projection=True,
    cross_attention_dim=TEXT_DIM,  # SDXL: 2048 = CLIP-L 768 + CLIP-G 1280, concatenated
    addition_embed_type="text_time",
    addition_time_embed_dim=8,  # SDXL: 256
    projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8,  # pooled + 6 time ids (SDXL: 2816)
)
# Kolors: SDXL's UNet, but ChatGLM3 text (4096 wide) projected inside the UNet to the 2048-wide
# cross-attention (`encoder_hid_proj`), and a 4096-wide pooled embedding (5632 = 4096 + 6*256).
_KOLORS = dict(
    _SDXL,
    cross_attention_dim=TEXT_DIM // 2,  # Kolors: 2048
    encoder_hid_dim=TEXT_DIM,  # Kolors: 4096, ChatGLM3's hidden size
    encoder_hid_dim_type="text_proj",
)

TINY_FAMILIES: dict[str, TinyFamily] = {
    fam.name: fam
    for fam in (
        TinyFamily(
            "flux",
            FluxTransformer2DModel,
            dict(
                _DIM, in_channels=16, num_layers=2, num_single_layers=2, joint_attention_dim=TEXT_DIM,
                pooled_projection_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_flux,
            forward_fn=_forward_flux,
        ),
        TinyFamily(
            "flux2",
            Flux2Transformer2DModel,
            dict(
                _DIM, in_channels=16, num_layers=2, num_single_layers=2, joint_attention_dim=TEXT_DIM,
                timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
            ),
            latent_channels=16,
            patch=1,
            cond_fn=_cond_flux2,
            forward_fn=_forward_flux2,
        ),
        TinyFamily(
            "sd3",
            SD3Transformer2DModel,
            dict(
                _DIM, sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                joint_attention_dim=TEXT_DIM, caption_projection_dim=32, pooled_projection_dim=TEXT_DIM,
                pos_embed_max_size=16,  # token grids up to 16x16
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_text_pooled,
            forward_fn=_forward_sd3_sana,
        ),
        TinyFamily(
            "chroma",
            ChromaTransformer2DModel,
            dict(
                _DIM, in_channels=16, num_layers=2, num_single_layers=2, joint_attention_dim=TEXT_DIM,
                axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=16,
                approximator_layers=1,
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_chroma,
            forward_fn=_forward_flux,
        ),
        TinyFamily(
            "sana",
            SanaTransformer2DModel,
            dict(
                _DIM, in_channels=4, out_channels=4, num_layers=3, num_cross_attention_heads=2,
                cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=TEXT_DIM,
                sample_size=8, patch_size=1,
            ),
            latent_channels=4,
            patch=1,
            cond_fn=_cond_text,
            forward_fn=_forward_sd3_sana,
        ),
        TinyFamily(
            "pixart",
            PixArtTransformer2DModel,
            dict(
                _DIM, in_channels=4, out_channels=8, num_layers=3, cross_attention_dim=32,
                caption_channels=TEXT_DIM, sample_size=8, patch_size=2,
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_text,
            forward_fn=_forward_pixart,
        ),
        TinyFamily(
            "hidream",
            HiDreamImageTransformer2DModel,
            dict(
                _DIM, patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
                caption_channels=[TEXT_DIM, TEXT_DIM], text_emb_dim=TEXT_DIM, num_routed_experts=4,
                num_activated_experts=2, axes_dims_rope=(8, 4, 4),
                max_resolution=(32, 32),  # non-square latents are padded to 32*32/p^2 = 256 tokens
                llama_layers=list(range(HIDREAM_LLAMA_LAYERS)),
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_hidream,
            forward_fn=_forward_hidream,
        ),
        TinyFamily(
            "auraflow",
            AuraFlowTransformer2DModel,
            dict(
                _DIM, sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=2,
                num_single_dit_layers=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=32,
                pos_embed_max_size=256,  # token grids up to 16x16
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_text,
            forward_fn=_forward_auraflow,
        ),
        TinyFamily(
            "lumina2",
            Lumina2Transformer2DModel,
            dict(
                sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=3,
                num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64), cap_feat_dim=TEXT_DIM,
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_lumina2,
            forward_fn=_forward_lumina2,
        ),
        TinyFamily(
            "dit",
            DiTTransformer2DModel,
            dict(
                _DIM, in_channels=4, out_channels=8, num_layers=3, sample_size=8, patch_size=2,
                num_embeds_ada_norm=DIT_CLASSES,
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_dit,
            forward_fn=_forward_dit,
            post_init=_no_label_dropout,
        ),
        TinyFamily(
            "flux3",
            Flux3Transformer2DModel,
            dict(
                _DIM, in_channels=16, cond_in_channels=16, num_layers=2, num_single_layers=2,
                joint_attention_dim=TEXT_DIM, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4),
            ),
            latent_channels=16,
            patch=1,
            cond_fn=_cond_flux3,
            forward_fn=_forward_flux3,
        ),
        TinyFamily(
            "qwenimage",
            QwenImageTransformer2DModel,
            dict(
                _DIM, patch_size=2, in_channels=16, out_channels=4, num_layers=3, joint_attention_dim=TEXT_DIM,
                axes_dims_rope=(4, 6, 6),
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_qwenimage,
            forward_fn=_forward_qwenimage,
        ),
        TinyFamily(
            "z_image",
            ZImageTransformer2DModel,
            dict(
                all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=3, n_refiner_layers=1,
                n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_DIM, axes_dims=[4, 6, 6],
                axes_lens=[256, 64, 64],  # caption positions + 1 (t axis), then H', W' up to 64
            ),
            latent_channels=4,
            patch=2,
            cond_fn=_cond_z_image,
            forward_fn=_forward_z_image,
        ),
        TinyFamily(
            "sd15",
            UNet2DConditionModel,
            _SD15,
            latent_channels=4,
            patch=1,
            cond_fn=_cond_text,
            forward_fn=_forward_unet,
            downsample=8,  # 3 of the 4 down blocks halve: mid block (h/8, w/8)
        ),
        TinyFamily(
            "sdxl",
            UNet2DConditionModel,
            _SDXL,
            latent_channels=4,
            patch=1,
            cond_fn=_cond_sdxl,
            forward_fn=_forward_unet,
            downsample=4,  # 2 of the 3 down blocks halve: mid block (h/4, w/4)
        ),
        TinyFamily(
            "kolors",
            UNet2DConditionModel,
            _KOLORS,
            latent_channels=4,
            patch=1,
            cond_fn=_cond_sdxl,
            forward_fn=_forward_unet,
            downsample=4,  # as sdxl
        ),
    )
}
