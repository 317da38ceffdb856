"""Tiny random video denoisers and video VAEs of the CREPA families, for tests, notebooks
and benchmarks, and the facts a per-frame capture needs (diffusers 0.42.1, checked by running
them in tests/test_tiny_video_models.py).

Each entry of `TINY_VIDEO_FAMILIES` builds the real diffusers class with a tiny config (hidden
size 32, 3 image blocks; milliseconds per step on CPU) and calls it as the family's pipeline does:

    fam = TINY_VIDEO_FAMILIES["wan"]
    model = fam.build(seed=0)
    x_t = torch.randn(2, fam.latent_channels, 3, 4, 8)       # (B, C, T, h, w), training space
    cond = fam.make_cond(batch_size=2, seed=0)
    pred = fam.forward(model, x_t, torch.rand(2), cond)      # (B, C, T, h, w), same as x_t
    fam.token_grid(3, 4, 8)                                  # (T', H', W') = (3, 2, 4)

Latents are always spatial (B, C, T, h, w), as training scripts cache them, in training space
(`normalize_latents` of the VAE's output). `t` is the flow-matching sigma in [0, 1]; all four
pipelines hand the scheduler's timestep (sigma * 1000) to the transformer, so `forward` does too.
The output is the raw prediction (velocity) in the layout of x_t.

What `forward` does before the transformer, as the pipelines do:
- wan (`WanPipeline`, pipeline_wan.py L621) and sanavideo (`SanaVideoPipeline`,
  pipeline_sana_video.py L950): nothing; the model takes (B, C, T, h, w) and patchifies it with
  a Conv3d of kernel = stride = `patch_size` (1, 2, 2). (Wan 2.2 TI2V-5B passes a per-token
  timestep (B, T'*H'*W') instead of (B,); same tokens.)
- ltxvideo (`LTXPipeline`): packs the latents into tokens (B, T'*H'*W', C*pt*p*p) in (T', H', W')
  order (`_pack_latents`, L420; `ltx_pack` here) and passes `num_frames, height, width` = the token
  grid, `rope_interpolation_scale = (8 / 25, 32, 32)` (VAE temporal ratio / frame_rate, VAE spatial
  ratios; L750) and the text mask; the output tokens are unpacked (`_unpack_latents`). Released
  LTX-Video has patch 1 and the pipeline passes the latent sizes (= the token grid only for patch 1;
  we pass the token grid, the same there and right otherwise).
- kandinsky5_video (`Kandinsky5T2VPipeline`, pipeline_kandinsky.py): channels last (B, T, h, w, C);
  with `config.visual_cond` (True in the released T2V Lite, configs/config_5s_sft.yaml) appends C
  zero channels (no conditioning frame) and a zero mask channel -> (B, T, h, w, 2C+1) (L647-661);
  `visual_rope_pos = [arange(T'), arange(H'), arange(W')]` (L853; the pipeline hard-codes // 2, the
  patch), `text_rope_pos = arange(L)`, `scale_factor = (1, 2, 2)` (480p-854p; else (1, 3.16, 3.16),
  L209), `sparse_params = None` (what the pipeline passes unless `config.attention_type == "nabla"`,
  L264-311). With `return_dict=False` the model returns a bare tensor (B, T, h, w, C), no tuple.
  `build` re-randomises `Kandinsky5Modulation` (zero-initialised by diffusers: adaLN-zero blocks are
  identities at init and their attention/FF get no gradient); released weights are not zero.

- hunyuan_video15 (`HunyuanVideo15Pipeline`, text-to-video): [latents, zero condition latents, zero
  mask] on channels (2C+1), timestep sigma * 1000, two text streams (Qwen2.5-VL + byT5) with masks and
  zero `image_embeds`; patch (1, 1, 1) as released.
- ltx2 (`LTX2Pipeline`): packs as LTX-Video (`ltx_pack`), timestep = sigma = sigma * 1000, latent sizes
  as `num_frames/height/width`, fps 24, and an audio token stream (`audio_hidden_states` in the
  conditioning, with its text states and mask); `forward` returns the video prediction only, so the
  audio head gets no gradient.

Facts (`VIDEO_FACTS`, `VIDEO_VAE_FACTS`). D = hidden width; r = VAE temporal ratio.

Blocks (class: block list(s), count in the tiny config; every block returns ONE tensor):
- wan, WanTransformer3DModel: `blocks` (3), image stream (B, T'H'W', D).
- ltxvideo, LTXVideoTransformer3DModel: `transformer_blocks` (3), (B, T'H'W', D).
- sanavideo, SanaVideoTransformer3DModel: `transformer_blocks` (3), (B, T'H'W', D).
- kandinsky5_video, Kandinsky5Transformer3DModel: `text_transformer_blocks` (1; text only, (B, L, D),
  run first) and `visual_transformer_blocks` (3; (B, T'H'W', D)).
- Per-frame tokens for all four: `out.reshape(B, T', H'*W', D)` (`frame_tokens`); Kandinsky 5 with
  nabla attention: `kandinsky_unfractal(out, (T', H', W'))`.
- hunyuan_video15, HunyuanVideo15Transformer3DModel: `transformer_blocks` (3), each returns a TUPLE
  (image (B, T'H'W', D), text); image tokens only in element 0 (the text joins inside the attention).
- ltx2, LTX2VideoTransformer3DModel: `transformer_blocks` (3), each returns a TUPLE (video (B, T'H'W', D),
  audio (B, L_a, D_a)); in the IC-LoRA / condition pipelines reference and keyframe tokens follow the
  N noisy video tokens in element 0.

- Every image block of the first four holds image tokens only (text enters by cross-attention; no text,
  register or padding tokens), flattened (T', H', W') row-major, frame-major. T' = T/pt, H' = h/ph, W' = w/pw:
  (1, 2, 2) for wan, sanavideo, kandinsky5_video (tiny and released); (1, 1, 1) for ltxvideo.
  Kandinsky 5: align on `visual_transformer_blocks` only (its text blocks hold (B, L, D) text).
- Verified by perturbing one latent position (t, y, x) and finding the only token that changes at
  the input of the first image block (`changed_tokens`): (t//pt)*H'W' + (y//ph)*W' + x//pw, and by
  the code: Wan/SanaVideo `patch_embedding(x).flatten(2).transpose(1, 2)` of (B, D, T', H', W')
  (transformer_wan.py L671, transformer_sana_video.py L651; SanaVideo's FF also unflattens its
  tokens as (T', H', W')); LTX `_pack_latents` `permute(0, 2, 4, 6, 1, 3, 5, 7)`; Kandinsky 5
  `fractal_flatten(block_mask=False)` = `x.flatten(1, 3)` of (B, T', H', W', D)
  (transformer_kandinsky.py L44).
- Block call conventions (for pre-hooks): Wan, SanaVideo and Kandinsky 5 call blocks positionally
  (hidden states first); LTX by keyword (`hidden_states=`).
- Kandinsky 5 sparse attention ("nabla", the 10 s checkpoints): the pipeline passes
  `sparse_params["to_fractal"] = True`, and `fractal_flatten` tiles each frame 8x8
  (`local_patching(x, (B, T', H', W'), (1, 8, 8))`): still frame-major, but inside a frame
  tiles row-major, then row-major inside a tile: index t*H'W' + (y//8 * W'/8 + x//8)*64 +
  (y%8)*8 + x%8 (H', W' multiples of 8). The capture can read `sparse_params` from the
  denoiser's call. Nabla builds a flex-attention `BlockMask`: it runs on CPU only forward, after
  `model.set_attention_backend("flex")` (CPU flex attention has no backward); verified on the tiny
  model that way. The tiny families use the default path (`attention_type="regular"`).
- Kandinsky 5's attention rounds the rotated q, k to bfloat16 (`apply_rotary`, L312), also in
  float32: deterministic, but with bf16-level error.

Latents and VAEs (latent channels released / tiny; VAE class; compression; training space ->
the input of `vae.decode`, as the pipeline does it):
- wan: 16 (Wan 2.1, 2.2 A14B; 48 for 2.2 TI2V-5B, its VAE spatial 16) / 4; AutoencoderKLWan;
  1+4n -> 1+n frames, spatial 8; `x * std + mean` per channel, from `vae.config.latents_mean/std`
  (pipeline_wan.py L664-673, written `x / (1 / std) + mean`).
- ltxvideo: 128 / 8; AutoencoderKLLTXVideo; 1+8n -> 1+n, spatial 32; unpack, then
  `x * vae.latents_std / vae.config.scaling_factor + vae.latents_mean` (buffers; sf 1.0;
  `_denormalize_latents`, pipeline_ltx.py L465, L825). VAE 0.9.1+ (`timestep_conditioning`) also
  mixes in `decode_noise_scale` noise and passes `decode_timestep` (pipeline default 0.0; 0.05 in
  the 0.9.1 examples) to `vae.decode` (L830-848).
- sanavideo: 16 / 4; AutoencoderKLWan (SANA-Video 2B 480p); as Wan (pipeline_sana_video.py
  L991-1010). The pipeline also takes AutoencoderDC (identity: no statistics, no scaling factor)
  and AutoencoderKLLTX2Video (its `latents_mean/std` buffers, no scaling factor).
- kandinsky5_video: 16 / 4; AutoencoderKLHunyuanVideo; 1+4n -> 1+n, spatial 8; channels first,
  then `x / vae.config.scaling_factor` (0.476986; no shift, no per-channel statistics;
  pipeline_kandinsky.py L963).

- Frames: latent frame 0 <- pixel frame 0 alone, latent frame k >= 1 <- pixel frames
  (k-1)*r+1 ... k*r; F pixel frames -> 1 + (F-1)//r latent frames (a ragged tail is dropped;
  Wan's `_encode` hard-codes chunks of 4, autoencoder_kl_wan.py L1147). Pixel frame k*r is the
  last frame of latent k's group (0 for k = 0): "first frame alone, then every r-th".
- Verified on the tiny VAEs by perturbing pixel frame j: the first latent frame that changes is
  ceil(j/r), and all later ones change (causal encoders), for Wan and LTX exactly. HunyuanVideo's
  GroupNorm takes statistics over the whole clip (C, T, H, W), so every pixel frame changes every
  latent frame (with random weights by similar amounts; with trained weights presumably much less);
  with a per-frame GroupNorm its causal convolutions show exactly the same groups.
  Decoders: Wan's is causal (latent k first changes pixel frame (k-1)*r+1), HunyuanVideo's too
  with per-frame norms; LTX's is not (`decoder_causal=False`): every latent frame changes every
  decoded frame.
- Ratios are read where the pipelines read them (`vae_ratios`): Wan `config.scale_factor_temporal/
  _spatial`, LTX the attributes `temporal/spatial_compression_ratio`, HunyuanVideo
  `config.temporal/spatial_compression_ratio`. The tiny LTX VAE has spatial 8 (released: 32 via
  its patch_size 4); the others match the released ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTX2Video,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    HunyuanVideo15Transformer3DModel,
    Kandinsky5Transformer3DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    SanaVideoTransformer3DModel,
    WanTransformer3DModel,
)
from torch import Tensor, nn

from lightning_repa.testing.tiny_models import TinyBuilder

Cond = dict[str, Tensor]
Grid3 = tuple[int, int, int]

TEXT_LEN = 5  # L: text tokens per sample
TEXT_DIM = 32  # width of every random text embedding
LTX_FRAME_RATE = 25  # LTXPipeline's default `frame_rate`
LTX_VAE_RATIOS = (8, 32)  # real LTX-Video VAE: temporal, spatial compression (the rope scale uses them)
KANDINSKY_ROPE_SCALE = (1.0, 2.0, 2.0)  # Kandinsky5T2VPipeline._get_scale_factor at 480p-854p
HV15_TEXT2_LEN = 3  # byT5 (glyph) tokens of the tiny HunyuanVideo 1.5 conditioning
HV15_IMAGE_TOKENS = 4  # SigLIP tokens of the tiny `image_embeds` (released: 729 x 1152; zeros for text-to-video)
LTX2_FRAME_RATE = 24.0  # LTX2Pipeline's default `frame_rate` (the transformer's `fps`)
LTX2_AUDIO_TOKENS = 4  # audio latent frames of the tiny LTX-2 call (the audio stream runs alongside the video)


@dataclass(frozen=True)
class TinyVideoFamily(TinyBuilder):
    """A tiny config of one diffusers video DiT and how to run it on spatial video latents."""

    name: str
    model_class: type[nn.Module]
    config: dict[str, Any] = field(repr=False)
    latent_channels: int  # C of the training-space latent (B, C, T, h, w)
    patch: Grid3  # latent positions per token: (frames, rows, cols)
    cond_fn: Callable[[int, torch.Generator], Cond] = field(repr=False)
    forward_fn: Callable[[nn.Module, Tensor, Tensor, Cond], Tensor] = field(repr=False)
    # re-randomises weights the class initialises to zero (Kandinsky 5's adaLN modulation), so
    # that the tiny blocks are not identities and every parameter gets a gradient
    post_init: Callable[[nn.Module], None] | None = field(default=None, repr=False)

    def forward(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Prediction (B, C, T, h, w) for noisy latents x_t (B, C, T, h, w) at noise levels t (B,) in [0, 1]."""
        if x_t.ndim != 5:
            raise ValueError(f"{self.name}: expected video latents (B, C, T, h, w), got shape {tuple(x_t.shape)}")
        self.token_grid(*x_t.shape[-3:])  # refuses sizes the patch does not divide
        return self.forward_fn(model, x_t, t, cond)

    def token_grid(self, t: int, h: int, w: int) -> Grid3:
        """(T', H', W') of the captured tokens for a latent of T frames and spatial size (h, w).

        Raises:
            ValueError: if t, h or w is not a multiple of the patch size along that axis.
        """
        pt, ph, pw = self.patch
        if t % pt or h % ph or w % pw:
            raise ValueError(f"{self.name}: latent (T, h, w) must be multiples of {self.patch}, got {(t, h, w)}")
        return t // pt, h // ph, w // pw


# ---------------------------------------------------------------- token layout helpers


def frame_tokens(x: Tensor, grid: Grid3) -> Tensor:
    """Block output (B, T'*H'*W', D), flattened (T', H', W') row-major, -> per-frame tokens (B, T', H'*W', D)."""
    tt, hh, ww = grid
    if x.ndim != 3 or x.shape[1] != tt * hh * ww:
        raise ValueError(f"expected (B, {tt * hh * ww}, D) tokens for grid {grid}, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], tt, hh * ww, x.shape[-1])


def kandinsky_unfractal(x: Tensor, grid: Grid3, tile: int = 8) -> Tensor:
    """Kandinsky 5 nabla order (8x8 tiles inside each frame) -> per-frame row-major tokens (B, T', H'*W', D).

    The inverse of `fractal_flatten(..., block_mask=True)`, as `fractal_unflatten` does it.
    """
    b, d = x.shape[0], x.shape[-1]
    tt, hh, ww = grid
    if hh % tile or ww % tile:
        raise ValueError(f"the fractal order needs H', W' multiples of {tile}, got {grid}")
    x = x.reshape(b, tt, hh // tile, ww // tile, tile, tile, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, tt, hh * ww, d)


# ---------------------------------------------------------------- conditioning


def _text(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g)


def _cond_wan(b: int, g: torch.Generator) -> Cond:
    return {"encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM)}  # (B, L, 32): umT5 states


def _cond_masked(b: int, g: torch.Generator) -> Cond:
    # ragged captions: valid lengths 5, 3, 5, 3, ... (right padding, as tokenizers pad)
    lengths = torch.tensor([TEXT_LEN - 2 * (i % 2) for i in range(b)])
    mask = (torch.arange(TEXT_LEN)[None] < lengths[:, None]).long()  # (B, L), 1 = keep
    return {"encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM), "encoder_attention_mask": mask}


def _cond_hunyuan_video15(b: int, g: torch.Generator) -> Cond:
    mask_2 = (torch.arange(HV15_TEXT2_LEN)[None] < torch.tensor([2 - (i % 2) for i in range(b)])[:, None]).long()
    return {
        **_cond_masked(b, g),  # Qwen2.5-VL states (B, L, 32) and their mask
        "encoder_hidden_states_2": _text(g, b, HV15_TEXT2_LEN, 16),  # byT5 glyph states (B, 3, 16)
        "encoder_attention_mask_2": mask_2,  # valid lengths 2, 1, 2, ...
        # HunyuanVideo15Pipeline (text-to-video) passes zeros; the model then masks these tokens out
        "image_embeds": torch.zeros(b, HV15_IMAGE_TOKENS, 16),
    }


def _cond_ltx2(b: int, g: torch.Generator) -> Cond:
    cond = _cond_masked(b, g)  # video text (B, L, 32) and the connector's mask
    return {
        **cond,
        "audio_encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM),  # the connector's audio text states
        "audio_encoder_attention_mask": cond["encoder_attention_mask"],  # the pipeline passes the same mask
        # the (noisy) audio latent tokens (B, L_audio, C_audio*mel): LTX-2 denoises audio and video together;
        # `forward` returns the video prediction only
        "audio_hidden_states": _text(g, b, LTX2_AUDIO_TOKENS, 8),
    }


def _cond_kandinsky(b: int, g: torch.Generator) -> Cond:
    return {
        "encoder_hidden_states": _text(g, b, TEXT_LEN, TEXT_DIM),  # (B, L, 32): Qwen2.5-VL states
        "pooled_projections": _text(g, b, TEXT_DIM),  # (B, 32): CLIP pooled
    }


# ---------------------------------------------------------------- forwards


def _forward_conv3d(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    """Wan and SanaVideo: the model patchifies (B, C, T, h, w) itself and returns that layout."""
    return model(hidden_states=x, timestep=t * 1000, return_dict=False, **cond)[0]


def ltx_pack(x: Tensor, p: int, pt: int) -> Tensor:
    """(B, C, T, h, w) -> (B, T/pt * h/p * w/p, C*pt*p*p), (T', H', W') order, as LTXPipeline._pack_latents."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def ltx_unpack(tokens: Tensor, grid: Grid3, p: int, pt: int) -> Tensor:
    """(B, T'*H'*W', C*pt*p*p) -> (B, C, T, h, w), as LTXPipeline._unpack_latents."""
    b = tokens.shape[0]
    x = tokens.reshape(b, *grid, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _forward_ltx(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    p, pt = model.config.patch_size, model.config.patch_size_t
    grid = (x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p)
    vae_t, vae_s = LTX_VAE_RATIOS
    out = model(
        hidden_states=ltx_pack(x, p, pt),  # (B, N, C*pt*p*p)
        timestep=t * 1000,
        num_frames=grid[0],
        height=grid[1],
        width=grid[2],
        rope_interpolation_scale=(vae_t / LTX_FRAME_RATE, vae_s, vae_s),
        return_dict=False,
        **cond,
    )[0]  # (B, N, C*pt*p*p)
    return ltx_unpack(out, grid, p, pt)


def _forward_kandinsky(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    pt, ph, pw = model.config.patch_size
    b, _, f, h, w = x.shape
    v = x.permute(0, 2, 3, 4, 1)  # (B, T, h, w, C), channels last
    if model.config.visual_cond:  # T2V: no conditioning frames, zero mask (Kandinsky5T2VPipeline.prepare_latents)
        v = torch.cat([v, torch.zeros_like(v), v.new_zeros(b, f, h, w, 1)], dim=-1)  # (B, T, h, w, 2C+1)
    text = cond["encoder_hidden_states"]
    out = model(
        hidden_states=v,
        timestep=t * 1000,
        visual_rope_pos=[torch.arange(n, device=x.device) for n in (f // pt, h // ph, w // pw)],
        text_rope_pos=torch.arange(text.shape[1], device=x.device),
        scale_factor=KANDINSKY_ROPE_SCALE,
        sparse_params=None,
        return_dict=False,
        **cond,
    )  # bare tensor (B, T, h, w, C)
    return out.permute(0, 4, 1, 2, 3)


def _forward_hunyuan_video15(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    # HunyuanVideo15Pipeline (text-to-video): [latents, zero condition latents, zero mask] on channels
    # (prepare_cond_latents_and_mask, L508-524; L737), timestep = scheduler timestep (sigma * 1000)
    v = torch.cat([x, torch.zeros_like(x), x.new_zeros(x.shape[0], 1, *x.shape[2:])], dim=1)  # (B, 2C+1, T, h, w)
    return model(hidden_states=v, timestep=t * 1000, return_dict=False, **cond)[0]  # (B, C, T, h, w)


def _forward_ltx2(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    p, pt = model.config.patch_size, model.config.patch_size_t
    _, _, f, h, w = x.shape
    grid = (f // pt, h // p, w // p)
    video, _audio = model(
        hidden_states=ltx_pack(x, p, pt),  # (B, N, C*pt*p*p), LTX2Pipeline._pack_latents (= LTX-Video's)
        timestep=t * 1000,  # LTX2Pipeline: the scheduler timestep (sigma * 1000), also as `sigma` (LTX-2.3)
        sigma=t * 1000,
        num_frames=f,  # latent sizes: `prepare_video_coords` steps them by the patch size itself
        height=h,
        width=w,
        fps=LTX2_FRAME_RATE,
        audio_num_frames=cond["audio_hidden_states"].shape[1],
        return_dict=False,
        **cond,
    )
    return ltx_unpack(video, grid, p, pt)


def _randomise_kandinsky_modulation(model: nn.Module) -> None:
    """Kandinsky5Modulation zero-initialises its projection (adaLN-zero: every block starts as the
    identity and its attention/FF get no gradient); give it small random weights instead."""
    for module in model.modules():
        if type(module).__name__ == "Kandinsky5Modulation":
            nn.init.normal_(module.out_layer.weight, std=0.1)
            nn.init.normal_(module.out_layer.bias, std=0.1)


# ---------------------------------------------------------------- families

_DIM = {"num_attention_heads": 2, "attention_head_dim": 16}  # hidden size 32

TINY_VIDEO_FAMILIES: dict[str, TinyVideoFamily] = {
    fam.name: fam
    for fam in (
        TinyVideoFamily(
            "wan",
            WanTransformer3DModel,
            dict(
                _DIM, patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=32,
                ffn_dim=64, num_layers=3, rope_max_seq_len=64,  # T', H', W' up to 64
            ),
            latent_channels=4,
            patch=(1, 2, 2),
            cond_fn=_cond_wan,
            forward_fn=_forward_conv3d,
        ),
        TinyVideoFamily(
            "ltxvideo",
            LTXVideoTransformer3DModel,
            dict(
                _DIM, in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, cross_attention_dim=32,
                num_layers=3, caption_channels=TEXT_DIM,
            ),
            latent_channels=8,
            patch=(1, 1, 1),
            cond_fn=_cond_masked,
            forward_fn=_forward_ltx,
        ),
        TinyVideoFamily(
            "sanavideo",
            SanaVideoTransformer3DModel,
            dict(
                _DIM, in_channels=4, out_channels=4, num_layers=3, num_cross_attention_heads=2,
                cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=TEXT_DIM,
                patch_size=(1, 2, 2), rope_max_seq_len=64,
            ),
            latent_channels=4,
            patch=(1, 2, 2),
            cond_fn=_cond_masked,
            forward_fn=_forward_conv3d,
        ),
        TinyVideoFamily(
            "kandinsky5_video",
            Kandinsky5Transformer3DModel,
            dict(
                in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM, time_dim=32,
                patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=3,
                axes_dims=(4, 6, 6),  # head dim 16 (t, h, w rope parts), 2 heads; T', H', W' up to 128
                visual_cond=True,  # as the released T2V Lite (configs/config_5s_sft.yaml)
            ),
            latent_channels=4,
            patch=(1, 2, 2),
            cond_fn=_cond_kandinsky,
            forward_fn=_forward_kandinsky,
            post_init=_randomise_kandinsky_modulation,
        ),
        TinyVideoFamily(
            "hunyuan_video15",
            HunyuanVideo15Transformer3DModel,
            dict(
                _DIM, in_channels=9, out_channels=4, num_layers=3, num_refiner_layers=1, patch_size=1,
                patch_size_t=1,  # as released (480p/720p): one token per latent position
                text_embed_dim=TEXT_DIM, text_embed_2_dim=16, image_embed_dim=16,
                rope_axes_dim=(4, 6, 6),  # head dim 16
            ),
            latent_channels=4,
            patch=(1, 1, 1),
            cond_fn=_cond_hunyuan_video15,
            forward_fn=_forward_hunyuan_video15,
        ),
        TinyVideoFamily(
            "ltx2",
            LTX2VideoTransformer3DModel,
            dict(
                _DIM, in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, cross_attention_dim=32,
                caption_channels=TEXT_DIM, num_layers=3,
                # audio stream: 2 heads of 8 (the a2v/v2a attention needs as many audio heads as video heads)
                audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8,
                audio_cross_attention_dim=16,
            ),
            latent_channels=8,
            patch=(1, 1, 1),
            cond_fn=_cond_ltx2,
            forward_fn=_forward_ltx2,
        ),
    )
}


# ---------------------------------------------------------------- facts


@dataclass(frozen=True)
class VideoFamilyFacts:
    """What a per-frame capture needs to know about one video DiT class (diffusers 0.42.1)."""

    model_class: str
    block_lists: tuple[tuple[str, int], ...]  # every nn.ModuleList of blocks, forward order, count in the tiny config
    align_blocks: str  # the list that holds the image stream (block_index counts within it)
    block_output: str  # "tensor": the block returns one tensor; "tuple[0]": a tuple, element 0 the image stream
    layout: str  # the stream inside the blocks
    to_frames: str  # how to get (B, T', H'*W', D)
    real_latent_channels: str
    vae: str  # the VAE class the released pipelines ship
    pipeline: str  # how the pipeline calls the model


VIDEO_FACTS: dict[str, VideoFamilyFacts] = {
    "wan": VideoFamilyFacts(
        "WanTransformer3DModel",
        (("blocks", 3),),
        "blocks",
        "tensor",
        "(B, T'*H'*W', D), image tokens only, (T', H', W') row-major; T'=T/1, H'=h/2, W'=w/2",
        "out.reshape(B, T', H'*W', D)",
        "16 (Wan 2.1, Wan 2.2 A14B); 48 (Wan 2.2 TI2V-5B, VAE z_dim 48, spatial 16)",
        "AutoencoderKLWan",
        "model(hidden_states=(B,C,T,h,w), timestep=sigma*1000 (B,) [TI2V-5B: (B, T'*H'*W')], "
        "encoder_hidden_states) -> tuple, [0] is (B,C,T,h,w); pipeline_wan.py L621",
    ),
    "ltxvideo": VideoFamilyFacts(
        "LTXVideoTransformer3DModel",
        (("transformer_blocks", 3),),
        "transformer_blocks",
        "tensor",
        "(B, T'*H'*W', D), image tokens only, (T', H', W') row-major (LTXPipeline._pack_latents); "
        "patch 1 in the released models, so (T', H', W') = (T, h, w)",
        "out.reshape(B, T', H'*W', D); the denoiser call also carries num_frames/height/width = (T', H', W')",
        "128",
        "AutoencoderKLLTXVideo",
        "model(hidden_states=packed (B,N,C), encoder_hidden_states, timestep=sigma*1000, encoder_attention_mask, "
        "num_frames, height, width, rope_interpolation_scale=(8/fps, 32, 32)) -> tuple, [0] (B,N,C); "
        "pipeline_ltx.py L771",
    ),
    "sanavideo": VideoFamilyFacts(
        "SanaVideoTransformer3DModel",
        (("transformer_blocks", 3),),
        "transformer_blocks",
        "tensor",
        "(B, T'*H'*W', D), image tokens only, (T', H', W') row-major (the block's GLUMBTempConv "
        "unflattens it as (T', H', W')); T'=T, H'=h/2, W'=w/2",
        "out.reshape(B, T', H'*W', D)",
        "16 (SANA-Video 2B 480p, Wan 2.1 VAE)",
        "AutoencoderKLWan (also accepted: AutoencoderDC, AutoencoderKLLTX2Video)",
        "model(hidden_states=(B,C,T,h,w), encoder_hidden_states, encoder_attention_mask, timestep=t*1000) "
        "-> tuple, [0] (B,C,T,h,w); pipeline_sana_video.py L950",
    ),
    "kandinsky5_video": VideoFamilyFacts(
        "Kandinsky5Transformer3DModel",
        (("text_transformer_blocks", 1), ("visual_transformer_blocks", 3)),
        "visual_transformer_blocks",
        "tensor",
        "(B, T'*H'*W', D), image tokens only; (T', H', W') row-major when sparse_params is None "
        "(attention_type 'regular'); with nabla (to_fractal) frame-major but 8x8-tile order inside a frame",
        "out.reshape(B, T', H'*W', D); nabla: kandinsky_unfractal(out, grid)",
        "16 (HunyuanVideo VAE)",
        "AutoencoderKLHunyuanVideo",
        "model(hidden_states=(B,T,h,w,C[+C+1 visual_cond]), encoder_hidden_states, pooled_projections, "
        "timestep=sigma*1000, visual_rope_pos, text_rope_pos, scale_factor, sparse_params) -> bare tensor "
        "(B,T,h,w,C) with return_dict=False; pipeline_kandinsky.py L885",
    ),
    "hunyuan_video15": VideoFamilyFacts(
        "HunyuanVideo15Transformer3DModel",
        (("transformer_blocks", 3),),
        "transformer_blocks",
        "tuple[0]",  # (hidden_states, encoder_hidden_states): element 0 is the image stream
        "(B, T'*H'*W', D), image tokens only (Conv3d patch embed, flatten(2).transpose(1, 2)); the text "
        "(valid image/byT5/Qwen tokens first, then their padding) is element 1 and joins only inside the "
        "attention, after the image tokens; T'=T/pt, H'=h/p, W'=w/p, (1, 1, 1) released",
        "out[0].reshape(B, T', H'*W', D)",
        "32 (HunyuanVideo-1.5 VAE, spatial 16, temporal 4)",
        "AutoencoderKLHunyuanVideo15",
        "model(hidden_states=cat([latents, cond_latents (0 for t2v), mask (0)], 1) (B,2C+1,T,h,w), "
        "timestep=sigma*1000, encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2, "
        "encoder_attention_mask_2, image_embeds (zeros (B,729,1152) for t2v)) -> tuple, [0] (B,C,T,h,w); "
        "pipeline_hunyuan_video1_5.py L737-786",
    ),
    "ltx2": VideoFamilyFacts(
        "LTX2VideoTransformer3DModel",
        (("transformer_blocks", 3),),
        "transformer_blocks",
        "tuple[0]",  # (video hidden_states, audio_hidden_states): element 0 is the video stream
        "(B, T'*H'*W' [+ appended reference/keyframe tokens in the IC-LoRA/condition pipelines], D): the N "
        "noisy video tokens first, (T', H', W') row-major (LTX2Pipeline._pack_latents); the audio stream is "
        "element 1; patch 1 released, so (T', H', W') = (T, h, w)",
        "out[0][:, :N].reshape(B, T', H'*W', D)",
        "128 (LTX-2 video VAE, spatial 32, temporal 8)",
        "AutoencoderKLLTX2Video (+ AutoencoderKLLTX2Audio and a vocoder for the audio stream)",
        "model(hidden_states=packed (B,N,C), audio_hidden_states (B,L_a,C_a*mel), encoder_hidden_states, "
        "audio_encoder_hidden_states (connector outputs), timestep=sigma*1000, sigma=sigma*1000, "
        "encoder_attention_mask, audio_encoder_attention_mask, num_frames/height/width (latent sizes), fps, "
        "audio_num_frames, video_coords, audio_coords) -> (video (B,N,C), audio); pipeline_ltx2.py L1415",
    ),
}


# ---------------------------------------------------------------- video VAEs


@dataclass(frozen=True)
class VideoVAEFacts:
    vae_class: str
    temporal: int  # r: pixel frames per latent frame after the first
    spatial: int  # pixels per latent side in the released VAE (the tiny VAE uses `tiny_spatial`)
    tiny_spatial: int
    decode: str  # training space -> VAE space, as the pipeline does before vae.decode
    source: str  # where diffusers does it

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames of F pixel frames: 1 + (F - 1) // r (the encoders drop a ragged tail)."""
        if pixel_frames < 1:
            raise ValueError(f"need at least one pixel frame, got {pixel_frames}")
        return 1 + (pixel_frames - 1) // self.temporal

    def pixel_frames_of_latent(self, k: int) -> range:
        """Pixel frames encoded into latent frame k: (0,) for k = 0, else (k-1)*r+1 ... k*r."""
        return range(0, 1) if k == 0 else range((k - 1) * self.temporal + 1, k * self.temporal + 1)


_WAN_VAE = VideoVAEFacts(
    "AutoencoderKLWan", 4, 8, 8,
    "z = x * latents_std + latents_mean (per channel, from vae.config.latents_mean/std)",
    "pipeline_wan.py L664-673 (written as x / (1 / std) + mean); pipeline_sana_video.py L997-1010",
)
VIDEO_VAE_FACTS: dict[str, VideoVAEFacts] = {
    "wan": _WAN_VAE,
    "sanavideo": _WAN_VAE,
    "ltxvideo": VideoVAEFacts(
        "AutoencoderKLLTXVideo", 8, 32, 8,
        "z = x * vae.latents_std / vae.config.scaling_factor + vae.latents_mean (buffers; scaling_factor 1.0); "
        "after unpacking; VAE 0.9.1+ (timestep_conditioning) also mixes noise and passes decode_timestep",
        "pipeline_ltx.py L465-472 (_denormalize_latents), L819-848",
    ),
    "kandinsky5_video": VideoVAEFacts(
        "AutoencoderKLHunyuanVideo", 4, 8, 8,
        "z = x / vae.config.scaling_factor (0.476986; no shift, no per-channel stats); after channels-first",
        "pipeline_kandinsky.py L963",
    ),
    "hunyuan_video15": VideoVAEFacts(
        "AutoencoderKLHunyuanVideo15", 4, 16, 8,
        "z = x / vae.config.scaling_factor (1.03682; no shift, no per-channel stats). Takes 1+4n frames only "
        "(a ragged tail raises in HunyuanVideo15Downsample, it is not dropped); encode/decode of a batch > 1 "
        "raise unless `vae.enable_slicing()` (mid-block attention mask, diffusers PR #13133)",
        "pipeline_hunyuan_video1_5.py L825",
    ),
    "ltx2": VideoVAEFacts(
        "AutoencoderKLLTX2Video", 8, 32, 8,
        "z = x * vae.latents_std / vae.config.scaling_factor + vae.latents_mean (buffers; sf 1.0), as LTX-Video; "
        "after unpacking; with `timestep_conditioning` the pipeline mixes in decode noise and passes the "
        "decode timestep. Takes 1+8n frames only (a ragged tail raises)",
        "pipeline_ltx2.py L697-704 (_denormalize_latents), L1633-1659",
    ),
}


def tiny_video_vae(family: str, seed: int = 0) -> nn.Module:
    """A tiny real video VAE of the family's class, latent channels = the tiny transformer's.

    - wan, sanavideo: AutoencoderKLWan, spatial 8, temporal 4, (3, 1+4n, 8H, 8W) -> (4, 1+n, H, W),
      non-trivial per-channel `latents_mean/std` in the config.
    - ltxvideo: AutoencoderKLLTXVideo, spatial 8 (real: 32 via patch_size 4), temporal 8,
      (3, 1+8n, 8H, 8W) -> (8, 1+n, H, W); `latents_mean/std` buffers set non-trivial.
    - kandinsky5_video: AutoencoderKLHunyuanVideo, spatial 8, temporal 4, -> (4, 1+n, H, W),
      default scaling_factor 0.476986.
    - hunyuan_video15: AutoencoderKLHunyuanVideo15, spatial 8 (real: 16), temporal 4, (3, 1+4n, 8H, 8W) ->
      (4, 1+n, H, W), default scaling_factor 1.03682; 1+4n frames only; slicing enabled (batches > 1 fail
      without it in diffusers 0.42.1).
    - ltx2: AutoencoderKLLTX2Video, spatial 8 (real: 32 via its patch_size 4), temporal 8, (3, 1+8n, 8H, 8W) ->
      (8, 1+n, H, W); `latents_mean/std` buffers set non-trivial; 1+8n frames only.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family in ("wan", "sanavideo"):
            return AutoencoderKLWan(
                base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.5, 2.0, 1.0],
            )
        if family == "ltxvideo":
            vae = AutoencoderKLLTXVideo(
                latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
                spatio_temporal_scaling=(True, True, True, False),
                decoder_spatio_temporal_scaling=(True, True, True, False),
                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
                patch_size=1, patch_size_t=1,
            )
            vae.latents_mean.copy_(torch.linspace(-0.4, 0.4, 8))
            vae.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
            return vae
        if family == "kandinsky5_video":
            return AutoencoderKLHunyuanVideo(
                latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                mid_block_add_attention=False,
            )
        if family == "hunyuan_video15":
            vae = AutoencoderKLHunyuanVideo15(
                latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                spatial_compression_ratio=8, temporal_compression_ratio=4,
            )
            # diffusers 0.42.1: its mid-block attention fails for a batch > 1 (the causal mask lacks
            # `.unsqueeze(1)`; huggingface/diffusers PR #13133); one sample at a time works
            vae.enable_slicing()
            return vae
        if family == "ltx2":
            vae = AutoencoderKLLTX2Video(
                latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 3,
                layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 4, patch_size=1, patch_size_t=1,
                upsample_residual=(False,) * 3, upsample_factor=(1,) * 3,
                # the default down blocks are (spatial, temporal, spatiotemporal, spatiotemporal): 8x8 with patch 1;
                # the class derives 16/16 from `spatio_temporal_scaling` alone, so say it
                spatial_compression_ratio=8, temporal_compression_ratio=8,
            )
            vae.latents_mean.copy_(torch.linspace(-0.4, 0.4, 8))
            vae.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
            return vae
    raise ValueError(f"unknown video family {family!r} (known: {', '.join(VIDEO_VAE_FACTS)})")


def _stats(vae: nn.Module, like: Tensor) -> tuple[Tensor, Tensor]:
    if isinstance(vae, AutoencoderKLWan):
        mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    else:  # LTX buffers
        mean, std = vae.latents_mean, vae.latents_std
    shape = (1, -1, 1, 1, 1)
    return mean.view(shape).to(like), std.view(shape).to(like)


def denormalize_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Training-space latents (B, C, T, h, w) -> what `vae.decode` takes, as each pipeline does it."""
    if isinstance(vae, AutoencoderKLWan):  # WanPipeline, SanaVideoPipeline
        mean, std = _stats(vae, latents)
        return latents * std + mean
    if isinstance(vae, (AutoencoderKLLTXVideo, AutoencoderKLLTX2Video)):  # LTX(2)Pipeline._denormalize_latents
        mean, std = _stats(vae, latents)
        return latents * std / vae.config.scaling_factor + mean
    if isinstance(vae, (AutoencoderKLHunyuanVideo, AutoencoderKLHunyuanVideo15)):  # Kandinsky5T2V, HunyuanVideo15
        return latents / vae.config.scaling_factor
    raise TypeError(f"no video de-normalisation known for {type(vae).__name__}")


def normalize_latents(vae: nn.Module, z: Tensor) -> Tensor:
    """VAE latents (B, C, T, h, w) -> training space: the inverse of `denormalize_latents`."""
    if isinstance(vae, AutoencoderKLWan):
        mean, std = _stats(vae, z)
        return (z - mean) / std
    if isinstance(vae, (AutoencoderKLLTXVideo, AutoencoderKLLTX2Video)):  # LTX(2)Pipeline._normalize_latents
        mean, std = _stats(vae, z)
        return (z - mean) * vae.config.scaling_factor / std
    if isinstance(vae, (AutoencoderKLHunyuanVideo, AutoencoderKLHunyuanVideo15)):
        return z * vae.config.scaling_factor
    raise TypeError(f"no video normalisation known for {type(vae).__name__}")


def vae_ratios(vae: nn.Module) -> tuple[int, int]:
    """(temporal, spatial) compression of a video VAE, read where the pipelines read it.

    Wan/SanaVideo: `vae.config.scale_factor_temporal/_spatial` (config values, not derived from the
    blocks); LTX: the attributes `vae.temporal/spatial_compression_ratio` (derived from the blocks and
    the patch size); HunyuanVideo (Kandinsky 5): `vae.config.temporal/spatial_compression_ratio`;
    HunyuanVideo 1.5 and LTX-2: the attributes `vae.temporal/spatial_compression_ratio`
    (pipeline_hunyuan_video1_5.py L218, pipeline_ltx2.py L271).
    """
    if isinstance(vae, AutoencoderKLWan):
        return int(vae.config.scale_factor_temporal), int(vae.config.scale_factor_spatial)
    if isinstance(vae, (AutoencoderKLLTXVideo, AutoencoderKLLTX2Video, AutoencoderKLHunyuanVideo15)):
        return int(vae.temporal_compression_ratio), int(vae.spatial_compression_ratio)
    if isinstance(vae, AutoencoderKLHunyuanVideo):
        return int(vae.config.temporal_compression_ratio), int(vae.config.spatial_compression_ratio)
    raise TypeError(f"no compression ratios known for {type(vae).__name__}")


def changed_tokens(model: nn.Module, fam: TinyVideoFamily, shape: tuple[int, ...], pos: Grid3) -> list[int]:
    """Token positions at the input of the first image block that change when only the latent
    position `pos` = (t, y, x) of a (B, C, T, h, w) latent is perturbed.

    The block's input comes before any attention, so exactly one token changes: the token of the
    patch holding `pos`. The flatten order is (T', H', W') row-major iff that token is
    (t//pt)*H'*W' + (y//ph)*W' + x//pw.
    """
    blocks = getattr(model, VIDEO_FACTS[fam.name].align_blocks)
    seen: list[Tensor] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    x2 = x.clone()
    x2[:, :, pos[0], pos[1], pos[2]] += 10.0
    t = torch.full((shape[0],), 0.5)
    cond = fam.make_cond(shape[0], seed=0)
    handle = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            fam.forward(model, x, t, cond)
            fam.forward(model, x2, t, cond)
    finally:
        handle.remove()
    diff = (seen[1] - seen[0]).abs().amax(dim=(0, 2))  # (N,)
    return torch.nonzero(diff > 1e-6).flatten().tolist()
