"""scikit-learn's 1,797 handwritten digits as a LightningDataModule for the CPU demo.

The 8×8 digits (values 0..16) ship inside the scikit-learn wheel, so nothing is downloaded.
They are scaled to [0, 1] and upsampled (bilinear) to ``image_size``. The demo diffuses in
pixel space, so the "clean latents" the REPA callback reads are the images mapped to [-1, 1].
"""

from __future__ import annotations

from typing import Dict, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

NUM_CLASSES = 10
NUM_DIGITS = 1797


def load_digit_images(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(images (N, 1, S, S) in [0, 1], labels (N,) long)``, in sklearn's order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError('the demo\'s digits come from scikit-learn: pip install "lightning_repa[demo]"') from None
    if image_size < 8:
        raise ValueError(f"`image_size` must be >= 8 (the digits are 8x8), got {image_size}")
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0)
    y = torch.from_numpy(digits.target).long()
    return x.contiguous(), y


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, val) index split: a seeded permutation, the first ``val_fraction`` held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class DigitsDataset(Dataset):
    """Items are dicts: ``latents`` (1, S, S) in [-1, 1], ``pixels`` (3, S, S) in [0, 1],
    ``labels`` (long), ``ids`` (long, the index among the 1,797 digits: stable across splits)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor):
        self.images, self.labels, self.ids = images, labels, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        img = self.images[i]  # (1, S, S) in [0, 1]
        return {
            "latents": img * 2.0 - 1.0,
            "pixels": img.expand(3, -1, -1).clone(),
            "labels": self.labels[i],
            "ids": self.ids[i],
        }


class HeldOutSplitLoaders(L.LightningDataModule):
    """The loaders of a data module whose `setup` fills `train_set` and `val_set` and that has
    `batch_size`, `num_workers` and `seed`: training shuffled by `seed`, validation in order."""

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_set) >= self.batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


class DigitsDataModule(HeldOutSplitLoaders):
    """The digits, split once by ``split_seed``: ``val_fraction`` held out (180 of 1,797 by default).

    Two seeds, so a run's seed can change the training order without changing the held-out set:
    the split stays the one the shipped teacher was scored on (``split_seed=0``) whatever ``seed``
    the run uses.

    Args:
        image_size: side of the square images (the 8×8 digits are upsampled bilinearly).
        batch_size: batch size of both loaders; the training loader drops the last partial batch
            so every optimizer step sees the same number of samples.
        num_workers: DataLoader workers (0: the whole data set is a few hundred KB in memory).
        val_fraction: held-out fraction; the same split the shipped teacher was scored on.
        seed: seeds the training shuffle (the Hydra app passes the run's ``seed``).
        split_seed: seeds the train/validation split; 0 is the split the shipped teacher was
            trained and scored on (another value puts some of its training digits in validation).
    """

    def __init__(
        self,
        image_size: int = 16,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        split_seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.val_fraction, self.seed, self.split_seed = val_fraction, seed, split_seed
        self.train_set: Optional[DigitsDataset] = None
        self.val_set: Optional[DigitsDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digit_images(self.image_size)
        train_idx, val_idx = split_indices(len(labels), self.val_fraction, self.split_seed)
        self.train_set = DigitsDataset(images[train_idx], labels[train_idx], train_idx)
        self.val_set = DigitsDataset(images[val_idx], labels[val_idx], val_idx)
