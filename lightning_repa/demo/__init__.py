"""The CPU demos: REPA on scikit-learn's digits with a tiny DiT (U-REPA with a small UNet), and a
tiny ViT teacher, all real.

Importing this package registers the teacher (``TEACHER_NAME``) with timm.
"""

from lightning_repa.demo.clips import DigitClipsDataModule
from lightning_repa.demo.data import DigitsDataModule, load_digit_images, split_indices
from lightning_repa.demo.module import FlowMatchingDiT
from lightning_repa.demo.unet import FlowMatchingUNet
from lightning_repa.demo.video import FlowMatchingVideo
from lightning_repa.demo.teacher import (
    TEACHER_MEAN,
    TEACHER_NAME,
    TEACHER_STD,
    load_teacher_classifier,
    normalize_for_teacher,
    register_teacher,
    teacher_checkpoint_path,
)

__all__ = [
    "DigitClipsDataModule",
    "DigitsDataModule",
    "FlowMatchingDiT",
    "FlowMatchingUNet",
    "FlowMatchingVideo",
    "TEACHER_MEAN",
    "TEACHER_NAME",
    "TEACHER_STD",
    "load_digit_images",
    "load_teacher_classifier",
    "normalize_for_teacher",
    "register_teacher",
    "split_indices",
    "teacher_checkpoint_path",
]
