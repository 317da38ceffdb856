"""Errors for `encoder_checkpoint` files that hold no weights name the file, what it holds and the fix."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from lightning_repa.encoders import load_encoder

ENCODER = "vit_tiny_digits_patch2"  # the demo's teacher: registered by `import lightning_repa.demo`


@pytest.fixture(autouse=True)
def _demo_teacher_registered():
    import lightning_repa.demo  # noqa: F401


def _message(path) -> str:
    with pytest.raises(ValueError) as info:
        load_encoder(ENCODER, image_size=16, checkpoint=path)
    return str(info.value)


@pytest.mark.parametrize(
    "content,found",
    [
        ({}, "found an empty dict;"),
        ({"state_dict": {}}, "found an empty dict under 'state_dict';"),
        ({"model": {"epoch": 3, "step": 100}}, "found a dict under 'model' with no tensors (keys 2: [epoch, step])"),
    ],
    ids=["empty", "empty-state-dict", "counters-only"],
)
def test_checkpoint_without_tensors_says_what_it_holds(tmp_path, content, found):
    path = tmp_path / "teacher.pth"
    torch.save(content, path)
    msg = _message(path)
    assert f"`encoder_checkpoint`={str(path)!r} holds no weights" in msg
    assert found in msg
    assert "expected the encoder's state dict" in msg and "torch.save(model.state_dict(), path)" in msg
    assert "missing keys" not in msg  # not reported as a list of every parameter the file lacks


def test_empty_safetensors_file_says_it_holds_no_weights(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_file({}, str(path))
    msg = _message(path)
    assert re.search(rf"{re.escape(repr(str(path)))} holds no weights: found an empty dict;", msg)


def test_mismatched_checkpoint_lists_no_empty_key_list(tmp_path):
    """A file with some tensors but not the model's: the side with no keys reads `0 (none)`, not `0: []`."""
    path = tmp_path / "teacher.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 64)}, path)
    msg = _message(path)
    assert "unexpected keys 0 (none)" in msg and "missing keys" in msg
