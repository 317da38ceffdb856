from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one thread per pytest-xdist worker (`-n 2` on 2 cores: two threads each would oversubscribe), two otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def dinov2_checkpoint(tmp_path_factory) -> str:
    """A ViT-S/14 DINOv2 checkpoint with random weights, in timm's format at 518 px."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    path = tmp_path_factory.mktemp("encoders") / "dinov2_vits14_random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture
def repa_options(dinov2_checkpoint) -> dict:
    """Options for a fast run: ViT-S/14 at 56 px (4x4 teacher tokens), images from the batch."""
    return dict(encoder="dinov2_vits14", encoder_checkpoint=dinov2_checkpoint, encoder_image_size=56, decoder="pixels")


@pytest.fixture
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return ASSETS
