"""Short clips of scikit-learn's digits moving across a canvas: the CREPA (video) demo's data.

Each of the 1,797 digits becomes one clip: the digit (upsampled to ``digit_size``) slides across
a black canvas of ``height`` x ``width`` by ``speed`` pixels per frame, in a direction fixed by the
digit's id (deterministic, the same in every run and split). The default 16x16 digit on a 16x24
canvas, 5 frames, 2 px per frame, travels the canvas edge to edge, left to right or right to left;
a taller canvas adds vertical and diagonal directions. The demo diffuses in pixel space, so the
clean "latents" are the clips in [-1, 1], laid out as video latents are, (C, T, H, W) with C = 1.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch.utils.data import Dataset

from lightning_repa.demo.data import HeldOutSplitLoaders, load_digit_images, split_indices

# Unit steps (dy, dx) in a fixed order; `clip_directions` keeps those the canvas has room for.
_UNIT_STEPS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))
# Digit i moves along the direction drawn with seed MOTION_SEED + i. A constant: the motion of a
# digit is part of the data set, not of the run (and sklearn's order cycles through the classes, so
# `id % k` would tie the direction to the label).
MOTION_SEED = 0


def clip_directions(height: int, width: int, digit_size: int, num_frames: int, speed: int) -> list[tuple[int, int]]:
    """The unit steps (dy, dx) along which a ``digit_size`` digit can travel ``speed * (num_frames - 1)``
    pixels without leaving a ``height`` x ``width`` canvas, in a fixed order."""
    travel = speed * (num_frames - 1)
    room_y, room_x = height - digit_size, width - digit_size
    return [(dy, dx) for dy, dx in _UNIT_STEPS if abs(dy) * travel <= room_y and abs(dx) * travel <= room_x]


def _require_directions(height: int, width: int, digit_size: int, num_frames: int, speed: int) -> list[tuple[int, int]]:
    dirs = clip_directions(height, width, digit_size, num_frames, speed)
    if not dirs:
        raise ValueError(
            f"a {digit_size}x{digit_size} digit cannot move {speed} px a frame for {num_frames} frames on a "
            f"{height}x{width} canvas (it needs {speed * (num_frames - 1)} px of room along one axis); lower "
            "`speed` or `num_frames`, or enlarge the canvas"
        )
    return dirs


def _start(room: int, travel: int, d: int) -> int:
    """First offset along one axis: the path is centred in the room (the digit itself when d = 0)."""
    lo = (room - abs(d) * travel) // 2
    return lo if d >= 0 else lo + travel


def make_clips(
    digits: torch.Tensor, ids: torch.Tensor, num_frames: int, height: int, width: int, speed: int
) -> torch.Tensor:
    """Digits (N, 1, S, S) in [0, 1] with ids (N,) -> clips (N, T, H, W) in [0, 1] on a black canvas.

    Frame k of digit i shows it at offset start + k * speed * (dy, dx), the path centred in the
    canvas; (dy, dx) is one of ``clip_directions``, drawn with the seed ``MOTION_SEED + ids[i]``.
    """
    n, s = digits.shape[0], digits.shape[-1]
    dirs = _require_directions(height, width, s, num_frames, speed)
    travel = speed * (num_frames - 1)
    clips = digits.new_zeros(n, num_frames, height, width)
    for i in range(n):
        gen = torch.Generator().manual_seed(MOTION_SEED + int(ids[i]))  # a function of the id alone
        dy, dx = dirs[int(torch.randint(len(dirs), (), generator=gen))]
        y0, x0 = _start(height - s, travel, dy), _start(width - s, travel, dx)
        for k in range(num_frames):
            y, x = y0 + k * speed * dy, x0 + k * speed * dx
            clips[i, k, y : y + s, x : x + s] = digits[i, 0]
    return clips


class DigitClipsDataset(Dataset):
    """Items are dicts: ``latents`` (1, T, H, W) in [-1, 1], ``pixels`` (T, 3, H, W) in [0, 1] (one
    RGB frame per latent frame, what the callback's ``decoder="pixels"`` reads for video),
    ``labels`` (long) and ``ids`` (long, the index among the 1,797 digits: stable across splits)."""

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor):
        self.clips, self.labels, self.ids = clips, labels, ids  # clips (N, T, H, W) in [0, 1]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        clip = self.clips[i]  # (T, H, W)
        return {
            "latents": clip.unsqueeze(0) * 2.0 - 1.0,  # (1, T, H, W)
            "pixels": clip.unsqueeze(1).expand(-1, 3, -1, -1).clone(),  # (T, 3, H, W)
            "labels": self.labels[i],
            "ids": self.ids[i],
        }


class DigitClipsDataModule(HeldOutSplitLoaders):
    """Clips of the digits moving across a canvas, split as :class:`DigitsDataModule` splits the
    digits: ``split_seed`` fixes the held-out digits (split 0 is the one the shipped teacher was
    scored on), ``seed`` the training shuffle, so a run's ``seed=N`` changes the order only.

    Batches: ``latents`` (B, 1, T, H, W) in [-1, 1], ``pixels`` (B, T, 3, H, W) in [0, 1],
    ``labels`` (B,), ``ids`` (B,).

    Args:
        num_frames: frames T of each clip.
        height: canvas height H.
        width: canvas width W (16x24 by default: non-square frames, as real videos have).
        digit_size: side of the digit (the 8x8 digits are upsampled bilinearly; 16 is the size the
            shipped teacher was trained on).
        speed: pixels the digit moves per frame; ``speed * (num_frames - 1)`` must fit in the
            canvas along at least one axis. Directions are drawn per digit id among those that fit.
        batch_size: batch size of both loaders; the training loader drops the last partial batch.
        num_workers: DataLoader workers (0: the clips are ~14 MB in memory).
        val_fraction: held-out fraction (180 of 1,797 by default).
        seed: seeds the training shuffle (the Hydra app passes the run's ``seed``).
        split_seed: seeds the train/validation split (0: the shipped teacher's).

    Raises:
        ValueError: for a non-positive size, a digit larger than the canvas, a ``speed`` below 1,
            a motion that does not fit the canvas or a ``batch_size`` below 1.
    """

    def __init__(
        self,
        num_frames: int = 5,
        height: int = 16,
        width: int = 24,
        digit_size: int = 16,
        speed: int = 2,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        split_seed: int = 0,
    ):
        super().__init__()
        if min(num_frames, height, width, digit_size) < 1:
            raise ValueError(
                f"`num_frames`, `height`, `width` and `digit_size` must be >= 1, got "
                f"{num_frames}, {height}, {width}, {digit_size}"
            )
        if digit_size > min(height, width):
            raise ValueError(f"`digit_size`={digit_size} does not fit a {height}x{width} canvas")
        if speed < 1:
            raise ValueError(f"`speed` must be >= 1 (pixels per frame), got {speed}")
        _require_directions(height, width, digit_size, num_frames, speed)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.num_frames, self.height, self.width = num_frames, height, width
        self.digit_size, self.speed = digit_size, speed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.seed, self.split_seed = val_fraction, seed, split_seed
        self.train_set: Optional[DigitClipsDataset] = None
        self.val_set: Optional[DigitClipsDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        digits, labels = load_digit_images(self.digit_size)
        ids = torch.arange(len(labels))
        clips = make_clips(digits, ids, self.num_frames, self.height, self.width, self.speed)  # (N, T, H, W)
        train_idx, val_idx = split_indices(len(labels), self.val_fraction, self.split_seed)
        self.train_set = DigitClipsDataset(clips[train_idx], labels[train_idx], train_idx)
        self.val_set = DigitClipsDataset(clips[val_idx], labels[val_idx], val_idx)
