"""The three methods of the convergence benchmark as data: which demo of the package each one trains,
where its aligned block sits, how that block's output is pooled for the probe, how samples become
frames for the teacher, and the settings of the committed run.

- ``repa``: the digits DiT (``experiment=demo``, ``FlowMatchingDiT``, PixArt), block ``block_index``
  of ``transformer.transformer_blocks`` (tokens (B, 64, D));
- ``urepa``: the digits UNet (``experiment=demo_unet``, ``FlowMatchingUNet``, SDXL layout), its
  ``unet.mid_block`` ((B, C, 4, 4));
- ``crepa``: the sliding-digit clips with the Wan DiT (``experiment=demo_video``,
  ``FlowMatchingVideo``), block ``block_index`` of ``transformer.blocks`` (tokens (B, T*8*12, D),
  frame-major).

The overrides of each setting are the ones the search (``benchmarks/search.py``,
``docs/search_*.md``) found best; the baseline arm gets the same overrides (they only change the
callback, or the budget of both arms) and no callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

CONDITIONAL, UNCONDITIONAL = "conditional", "unconditional"


@dataclass(frozen=True)
class Setting:
    """One row of the committed run: a method, whether labels reach the model, a budget and the
    Hydra overrides of the method's experiment."""

    name: str
    method: str
    conditional: bool
    steps: int
    eval_every: int
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class MethodSpec:
    """How the benchmark drives one method's demo."""

    name: str
    experiment: str
    block: Callable[[Any, int], nn.Module]  # (LightningModule, block_index) -> the aligned block
    video: bool
    settings: tuple[Setting, ...] = field(default=())
    evals: tuple[tuple[str, Any], ...] = ()  # EvalOptions fields this method changes (clips cost more)

    def setting(self, conditional: bool) -> Setting:
        for s in self.settings:
            if s.conditional == conditional:
                return s
        raise ValueError(f"--method {self.name} has no {'conditional' if conditional else 'unconditional'} setting")


def _dit_block(model: Any, index: int) -> nn.Module:
    return model.transformer.transformer_blocks[index]


def _unet_mid(model: Any, index: int) -> nn.Module:
    return model.unet.mid_block  # U-REPA's block; the index is not used


def _wan_block(model: Any, index: int) -> nn.Module:
    return model.transformer.blocks[index]


def pool(output: Any) -> Tensor:
    """A block's output averaged over its tokens (the package's probe pools so): tokens (B, T, D) over T,
    feature maps (B, C, h, w) over h and w. Returns (B, D) float64."""
    x = output[0] if isinstance(output, (tuple, list)) else output
    if x.dim() == 3:
        return x.double().mean(dim=1)
    if x.dim() == 4:
        return x.double().mean(dim=(2, 3))
    raise ValueError(f"cannot pool a block output of shape {tuple(x.shape)}")


def as_frames(x: Tensor) -> Tensor:
    """Samples as frames for the image teacher: images (N, 1, H, W) as they are, clips (N, 1, T, H, W)
    as (N*T, 1, H, W), clip-major."""
    if x.dim() == 4:
        return x
    n, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(n * t, c, h, w)


def per_sample(features: Tensor, n: int) -> Tensor:
    """Frame features (N*T, D) back to one vector per sample (N, D): the mean over its frames."""
    return features.reshape(n, -1, features.shape[-1]).mean(dim=1)


# The committed run (issue 22): the unconditional row of each method (5 paired seeds), REPA's at
# 1,200 steps, and REPA's conditional row. The overrides are the search's choice (docs/search_*.md):
# REPA and U-REPA as their demos configure them; CREPA with a constant weight (schedule=i2v: the demo's
# t2v warm-up and decay keep the weight low for most of a 400-step run), the teacher at the frames' own
# scale (encoder_image_size=20: 16x24 frames as they are, 8x12 teacher tokens, the student's grid) and
# block 2 of 4 (lightning-repa-probe's suggestion on a trained baseline) instead of the demo's block 1.
METHODS: dict[str, MethodSpec] = {
    "repa": MethodSpec("repa", "demo", _dit_block, video=False, settings=(
        Setting("repa_unconditional", "repa", False, steps=1200, eval_every=150),
        Setting("repa_conditional", "repa", True, steps=400, eval_every=50),
    )),
    "urepa": MethodSpec("urepa", "demo_unet", _unet_mid, video=False, settings=(
        Setting("urepa_unconditional", "urepa", False, steps=400, eval_every=50),
    )),
    "crepa": MethodSpec("crepa", "demo_video", _wan_block, video=True, settings=(
        Setting("crepa_unconditional", "crepa", False, steps=400, eval_every=50,
                overrides=("schedule=i2v", "repa.encoder_image_size=20", "repa.block_index=2")),
    ), evals=(("fd_samples", 200), ("probe_train", 600), ("batch_size", 50))),  # 200 clips: 1,000 frames
}


def settings_for(methods: Sequence[str], which: Sequence[str]) -> list[Setting]:
    """The settings of ``methods`` whose kind (conditional / unconditional) is in ``which``."""
    out = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown --method {m!r}; known: {', '.join(METHODS)}")
        out += [s for s in METHODS[m].settings if (CONDITIONAL if s.conditional else UNCONDITIONAL) in which]
    return out


def dataset_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """A demo dataset's samples (N, 1, S, S) or (N, 1, T, H, W) in [0, 1] and labels (N,)."""
    if hasattr(dataset, "clips"):
        return dataset.clips.unsqueeze(1), dataset.labels  # clips (N, T, H, W) -> (N, 1, T, H, W)
    return dataset.images, dataset.labels


def null_labels(n: int) -> Tensor:
    """``n`` NULL labels (the demo's "no class" index)."""
    from lightning_repa.demo.module import NULL_CLASS

    return torch.full((n,), NULL_CLASS, dtype=torch.long)


def null_label_forward(model: Any, x_t: Tensor, t: Tensor, batch: Any) -> Any:
    """``lightning-repa-probe``'s ``forward=`` for the unconditional models: ``model(x_t, t, NULL labels)``."""
    return model(x_t, t, null_labels(len(x_t)).to(x_t.device))


def unconditional(cls: type) -> type:
    """``cls`` trained unconditionally: every training label becomes NULL_CLASS (label dropout still
    draws its random numbers, so the RNG stream matches the conditional setting's)."""

    class Unconditional(cls):  # type: ignore[misc, valid-type]
        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return super().training_step({**batch, "labels": null_labels(len(batch["labels"]))}, batch_idx)

    Unconditional.__name__ = Unconditional.__qualname__ = f"Unconditional{cls.__name__}"
    return Unconditional
