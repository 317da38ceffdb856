"""Shared test scaffolding: a flow-matching LightningModule around any tiny diffusers family,
deterministic latent/pixel data, and a trainer factory. Module-level so ddp_spawn can pickle it."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_repa.tiny_models import TINY_FAMILIES


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


class TinyFlow(L.LightningModule):
    """Rectified flow on a tiny diffusers denoiser (`self.transformer`). The noise of a sample
    depends only on its id and the optimizer step, never on the global RNG."""

    def __init__(self, family: str, seed: int = 0, lr: float = 1e-2, optimizer: str = "sgd") -> None:
        super().__init__()
        self.family_name, self.lr, self.optimizer_name = family, lr, optimizer
        self.fam = TINY_FAMILIES[family]
        self.transformer = self.fam.build(seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"]  # (B, C, h, w)
        b = x0.shape[0]
        g = torch.Generator().manual_seed(int(batch["ids"].sum()) * 7919 + self.global_step)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        t = torch.rand(b, generator=g).to(x0)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pred = self.fam.forward(self.transformer, x_t, t, self.fam.make_cond(b, seed=0))
        loss = F.mse_loss(pred, noise - x0)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(family: str, batch_size: int = 2, **kwargs: Any) -> DataLoader:
    return DataLoader(LatentData(family, **kwargs), batch_size=batch_size, shuffle=False)


def trainer(max_steps: int = 3, callbacks: Optional[list] = None, **kwargs: Any) -> L.Trainer:
    options = dict(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [], deterministic=True,
        log_every_n_steps=1,  # `repa/*` reach callback_metrics on the steps Lightning writes logs
    )
    options.update(kwargs)
    return L.Trainer(**options)


class Recorder(L.Callback):
    """Observes a RepaCallback through its public seams only (put it after the callback):

    - `results`: each micro-batch's `repa.last_result` (weight, loss, similarity, method terms);
    - `inputs`: each call of `repa.objective`, as a dict with the student tokens (as handed over,
      graph included), their grid, the teacher tokens and their grid;
    - `steps`: once per optimizer step, the step, the similarity logged for it (None when no
      micro-batch measured), every logged `repa/*` value and the cutoff's EMA after it;
    - `initial`: the projector's weights at fit start.
    """

    def __init__(self, repa: Any) -> None:
        self.repa = repa
        self.results: list[Any] = []
        self.inputs: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        objective = repa.objective

        def observed(student, grid_s, teacher, grid_t, projector):
            self.inputs.append(dict(student=student, grid_s=grid_s, teacher=teacher, grid_t=grid_t))
            return objective(student, grid_s, teacher, grid_t, projector)

        repa.objective = observed

    def on_fit_start(self, trainer, pl_module):
        projector = getattr(pl_module, self.repa.projector_attr)
        self.initial = {k: v.detach().clone() for k, v in projector.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, *args):
        result = self.repa.last_result
        self.results.append(result)
        if trainer.global_step == result.step:
            return  # still accumulating
        mine = [r for r in self.results if r.step == result.step]
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("repa/")}
        self.steps.append(dict(step=result.step, logged=logged, ema=self.repa.cutoff.ema,
                               similarity=logged["repa/similarity"] if any(r.measured and not r.skipped for r in mine)
                               else None))

    def measured_steps(self) -> list[int]:
        return [s["step"] for s in self.steps if s["similarity"] is not None]


class VideoData(Dataset):
    """Item i: video latents (C, T, h, w), pixel frames (F, 3, H, W) in [0, 1], ids = i."""

    def __init__(self, family: str, n: int = 4, thw: tuple[int, int, int] = (3, 4, 8),
                 frames_hw: tuple[int, int, int] = (3, 32, 64)) -> None:
        from lightning_repa.tiny_video_models import TINY_VIDEO_FAMILIES

        self.channels = TINY_VIDEO_FAMILIES[family].latent_channels
        self.n, self.thw, self.frames_hw = n, thw, frames_hw

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(2000 + i)
        f, h, w = self.frames_hw
        return {"latents": torch.randn(self.channels, *self.thw, generator=g),
                "pixels": torch.rand(f, 3, h, w, generator=g), "ids": i}


class TinyVideoFlow(L.LightningModule):
    """Rectified flow on a tiny diffusers video denoiser (`self.transformer`), like TinyFlow."""

    def __init__(self, family: str, seed: int = 0, lr: float = 1e-2) -> None:
        super().__init__()
        from lightning_repa.tiny_video_models import TINY_VIDEO_FAMILIES

        self.family_name, self.lr = family, lr
        self.fam = TINY_VIDEO_FAMILIES[family]
        self.transformer = self.fam.build(seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"]  # (B, C, T, h, w)
        g = torch.Generator().manual_seed(int(batch["ids"].sum()) * 7919 + self.global_step)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        t = torch.rand(x0.shape[0], generator=g).to(x0)
        x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
        pred = self.fam.forward(self.transformer, x_t, t, self.fam.make_cond(x0.shape[0], seed=0))
        return F.mse_loss(pred, noise - x0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def video_loader(family: str, batch_size: int = 2, **kwargs: Any) -> DataLoader:
    return DataLoader(VideoData(family, **kwargs), batch_size=batch_size, shuffle=False)
