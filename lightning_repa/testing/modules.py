"""Tiny Lightning modules and data around the tiny denoisers, for tests, notebooks and benchmarks.

`TinyFlow` / `TinyVideoFlow` train a tiny diffusers denoiser of any family by rectified flow on
deterministic random latents (`LatentData` / `VideoData`); the noise of a sample depends only on
its id and the optimizer step, never on the global RNG, so two runs see the same draws whatever
else draws from the global generators. Module-level classes, so `ddp_spawn` can pickle them::

    from lightning_repa.testing import TinyFlow, tiny_loader
    trainer.fit(TinyFlow("flux"), tiny_loader("flux", n=8))
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_repa.testing.tiny_models import TINY_FAMILIES
from lightning_repa.testing.tiny_video_models import TINY_VIDEO_FAMILIES


class LatentData(Dataset):
    """Item i: latents (C, h, w), pixels (3, H, W) in [0, 1], ids = i; a pure function of i."""

    def __init__(self, family: str, n: int = 8, hw: tuple[int, int] = (8, 16), image_hw: tuple[int, int] = (64, 128),
                 offset: int = 0) -> None:
        self.channels = TINY_FAMILIES[family].latent_channels
        self.n, self.hw, self.image_hw, self.offset = n, hw, image_hw, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(1000 + i + self.offset)
        return {
            "latents": torch.randn(self.channels, *self.hw, generator=g),
            "pixels": torch.rand(3, *self.image_hw, generator=g),
            "ids": i + self.offset,
        }


class VideoData(Dataset):
    """Item i: video latents (C, T, h, w), pixel frames (F, 3, H, W) in [0, 1], ids = i. By default
    F = 1 + (T - 1) * r, the clip the family's VAE (temporal compression r) encodes into T latent frames."""

    def __init__(self, family: str, n: int = 4, thw: tuple[int, int, int] = (3, 4, 8),
                 frames_hw: tuple[int, int, int] | None = None) -> None:
        from lightning_repa.models.families import FAMILIES

        self.channels = TINY_VIDEO_FAMILIES[family].latent_channels
        frames = 1 + (thw[0] - 1) * FAMILIES[family].temporal_compression
        self.n, self.thw, self.frames_hw = n, thw, frames_hw or (frames, 32, 64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(2000 + i)
        f, h, w = self.frames_hw
        return {"latents": torch.randn(self.channels, *self.thw, generator=g),
                "pixels": torch.rand(f, 3, h, w, generator=g), "ids": i}


class TinyFlow(L.LightningModule):
    """Rectified flow on a tiny diffusers denoiser (`self.transformer`) of an image or UNet family."""

    def __init__(self, family: str, seed: int = 0, lr: float = 1e-2, optimizer: str = "sgd") -> None:
        super().__init__()
        self.family_name, self.lr, self.optimizer_name = family, lr, optimizer
        self.fam = TINY_FAMILIES[family]
        self.transformer = self.fam.build(seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x0 = batch["latents"]  # (B, C, h, w)
        noise, t = _draws(batch, self.global_step, x0)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pred = self.fam.forward(self.transformer, x_t, t, self.fam.make_cond(x0.shape[0], seed=0))
        loss = F.mse_loss(pred, noise - x0)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyVideoFlow(L.LightningModule):
    """Rectified flow on a tiny diffusers video denoiser (`self.transformer`), like `TinyFlow`."""

    def __init__(self, family: str, seed: int = 0, lr: float = 1e-2) -> None:
        super().__init__()
        self.family_name, self.lr = family, lr
        self.fam = TINY_VIDEO_FAMILIES[family]
        self.transformer = self.fam.build(seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x0 = batch["latents"]  # (B, C, T, h, w)
        noise, t = _draws(batch, self.global_step, x0)
        x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
        pred = self.fam.forward(self.transformer, x_t, t, self.fam.make_cond(x0.shape[0], seed=0))
        return F.mse_loss(pred, noise - x0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _draws(batch: dict[str, Any], step: int, x0: Tensor) -> tuple[Tensor, Tensor]:
    """The noise (like x0) and flow times (B,) of a batch: a function of its ids and the step only."""
    g = torch.Generator().manual_seed(int(batch["ids"].sum()) * 7919 + step)
    noise = torch.randn(x0.shape, generator=g).to(x0)
    t = torch.rand(x0.shape[0], generator=g).to(x0)
    return noise, t


def tiny_loader(family: str, batch_size: int = 2, **kwargs: Any) -> DataLoader:
    """A DataLoader over `LatentData(family, **kwargs)`, in order."""
    return DataLoader(LatentData(family, **kwargs), batch_size=batch_size, shuffle=False)


def tiny_video_loader(family: str, batch_size: int = 2, **kwargs: Any) -> DataLoader:
    """A DataLoader over `VideoData(family, **kwargs)`, in order."""
    return DataLoader(VideoData(family, **kwargs), batch_size=batch_size, shuffle=False)
