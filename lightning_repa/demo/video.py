"""A small class-conditional video DiT (diffusers' Wan transformer) trained with rectified flow:
the CREPA demo's student.

A real ``diffusers.WanTransformer3DModel`` at ``self.transformer`` (family ``wan``) learns the
moving-digit clips of :class:`~lightning_repa.demo.clips.DigitClipsDataModule` in pixel space.
Everything but the model, the noise shape and the picture written after training is
:class:`~lightning_repa.demo.module.FlowMatching`'s, shared with the image demos: label dropout,
optimizer, learning-rate schedule and the guided Euler sampler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from diffusers import WanTransformer3DModel

from lightning_repa.demo.module import FlowMatching

PATCH = (1, 2, 2)  # (frames, rows, cols) per token, as the released Wan models


class FlowMatchingVideo(FlowMatching):
    """Rectified flow on (B, 1, T, H, W) clips with a Wan transformer: ``x_t = (1 - t) x0 + t eps``,
    predict ``v = eps - x0``.

    The Wan model patchifies (1, 2, 2), so its blocks hold T x (H/2) x (W/2) tokens (5 x 8 x 12 for
    the default 5-frame 16x24 clips), frame-major, which is where CREPA reads its per-frame tokens.
    The class label enters as a one-token "caption" (``encoder_hidden_states``, Wan's text input):
    ``nn.Embedding(11, caption_channels)``, index 10 being the null class that replaces the label
    with probability ``cfg_dropout`` (classifier-free guidance at sampling).

    Args:
        num_frames: frames T of the clips.
        height: frame height H (even: patch 2).
        width: frame width W (even: patch 2).
        num_layers: Wan blocks (``transformer.blocks``, 0-based indices 0..num_layers-1). Wan's
            default CREPA block 8 needs ``num_layers >= 9``, so model/demo_wan.yaml sets
            ``block_index`` itself (1: the output of the second of 4 blocks).
        num_heads: attention heads; the width is ``num_heads * head_dim``.
        head_dim: channels per head. Wan has no absolute position embedding, only a 3-D RoPE that
            gives rows and columns ``2 * (head_dim // 6)`` channels each: 32 gives them 5
            frequencies, 16 only 2 (400 steps, same seed: validation loss 0.160 with 2 heads of 32,
            0.212 with 4 of 16).
        ffn_dim: hidden width of each block's feed-forward.
        freq_dim: width of the sinusoidal timestep embedding.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        cfg_dropout: probability of replacing the label with the null class in training.
        seed: seeds the model's initialisation only (times, noise and label dropout use the
            global RNG: call ``L.seed_everything`` for a reproducible run).
        warmup_steps: linear learning-rate warm-up (optimizer steps).
        min_lr_ratio: the learning rate decays (cosine) to ``lr * min_lr_ratio`` at the
            trainer's ``max_steps``; constant after warm-up when ``max_steps`` is not set.
        caption_channels: width of the label embedding (Wan's ``text_dim``).
        time_sampling: ``"logit_normal"`` (SD3's, mean 0, std 1) or ``"uniform"``.

    Raises:
        ValueError: for an odd ``height`` or ``width``, ``num_frames`` below 1, an unknown
            ``time_sampling`` or a ``cfg_dropout`` outside [0, 1).
    """

    def __init__(
        self,
        num_frames: int = 5,
        height: int = 16,
        width: int = 24,
        num_layers: int = 4,
        num_heads: int = 2,
        head_dim: int = 32,
        ffn_dim: int = 128,
        freq_dim: int = 64,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        cfg_dropout: float = 0.1,
        seed: int = 0,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        caption_channels: int = 64,
        time_sampling: str = "logit_normal",
    ):
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"`num_frames` must be >= 1, got {num_frames}")
        if height % PATCH[1] or width % PATCH[2] or min(height, width) < 2:
            raise ValueError(f"`height` and `width` must be positive and even (patch 2), got {height}x{width}")
        self.check_training_args(time_sampling, cfg_dropout)
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transformer = WanTransformer3DModel(
                patch_size=PATCH,
                num_attention_heads=num_heads,
                attention_head_dim=head_dim,
                in_channels=1,
                out_channels=1,
                text_dim=caption_channels,
                freq_dim=freq_dim,
                ffn_dim=ffn_dim,
                num_layers=num_layers,
            )
            self.init_label_head(self.transformer.proj_out, caption_channels)

    # -- model -------------------------------------------------------------------------------

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity for noisy clips ``x_t`` (B, 1, T, H, W) at times ``t`` (B,) in [0, 1]."""
        return self.transformer(
            hidden_states=x_t,
            timestep=t * 1000.0,  # the Wan pipeline hands the scheduler's sigma * 1000
            encoder_hidden_states=self.caption(labels),
            return_dict=False,
        )[0]  # (B, 1, T, H, W)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(T, H, W) of one clip."""
        return (self.hparams.num_frames, self.hparams.height, self.hparams.width)

    def save_sample_grid(
        self,
        path: Union[str, Path],
        steps: int = 20,
        per_class: int = 8,
        guidance: float = 2.0,
        scale: int = 4,
        seed: int = 0,
        title: str = "",
    ) -> Path:
        """Write a PNG strip: one row per sampled clip (classes 0..9, ``per_class`` clips each, in
        that order), its T frames side by side, upscaled ``scale``x (nearest) with a 1-pixel
        (pre-scale) gray gap. The image is ``(10 * per_class * (H + 1) + 1) * scale`` pixels high and
        ``(T * (W + 1) + 1) * scale`` wide, with the class left of each row, the frame index above each
        column and `title` above. Returns the path."""
        hp = self.hparams
        labels = torch.arange(10).repeat_interleave(per_class)
        clips = self.sample(labels, steps=steps, guidance=guidance, seed=seed).cpu()  # (10·k, 1, T, H, W)
        t, h, w, pad = hp.num_frames, hp.height, hp.width, 1
        rows = len(labels)
        grid = np.full((rows * (h + pad) + pad, t * (w + pad) + pad), 0.5, dtype=np.float32)
        for r, clip in enumerate(clips[:, 0].numpy()):  # (T, H, W)
            y = pad + r * (h + pad)
            for k, frame in enumerate(clip):
                x = pad + k * (w + pad)
                grid[y : y + h, x : x + w] = frame
        rows = [(pad + r * (h + pad) + h // 2, f"class {int(label)}") for r, label in enumerate(labels)]
        columns = [(pad + k * (w + pad) + w // 2, f"frame {k}") for k in range(t)]
        return self.write_png(grid, scale, path, title, rows=rows, columns=columns)
