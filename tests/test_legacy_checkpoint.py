"""A checkpoint written by the flat layout of 0.1.0 (before the layers; `tests/data/legacy_layout.ckpt`,
three callbacks: an encoder teacher with a similarity cutoff, a backbone teacher, a named one) resumes
with today's package: every callback finds its state, every projector its weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import TinyFlow, loader, trainer
from lightning_repa import RepaCallback

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_layout.ckpt"


def _callbacks(options: dict) -> list[RepaCallback]:
    """The three callbacks the checkpoint was written with (same order, same options)."""
    return [RepaCallback(family="sd3", block_index=1, similarity_threshold=0.99, similarity_ema_decay=0.5, **options),
            RepaCallback(family="sd3", block_index=0, teacher="backbone", teacher_block_index=2, lam=0.2),
            RepaCallback(family="sd3", block_index=2, name="late", **options)]


class _AtTrainStart(L.Callback):
    def __init__(self, repas: list[RepaCallback]) -> None:
        self.repas, self.seen = repas, {}

    def on_train_start(self, trainer, pl_module):
        self.seen = {"step": trainer.global_step, "ema": [r.cutoff.ema for r in self.repas],
                     "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items() if "repa" in k}}


def test_a_checkpoint_of_the_flat_layout_resumes(repa_options):
    saved = torch.load(LEGACY, map_location="cpu", weights_only=True)
    old_states = [v for k, v in saved["callbacks"].items() if k.startswith("RepaCallback")]
    assert any("'teacher': 'block 2'" in k for k in saved["callbacks"]), "the old key of a backbone teacher"
    repas = _callbacks(repa_options)
    assert len({r.state_key for r in repas}) == 3 and any("'name': 'late'" in r.state_key for r in repas)
    probe = _AtTrainStart(repas)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(5, [*repas, probe], enable_checkpointing=False).fit(TinyFlow("sd3"), loader("sd3", n=16),
                                                                   ckpt_path=str(LEGACY))
    assert probe.seen["step"] == saved["global_step"] == 3
    assert probe.seen["ema"] == pytest.approx([s["cutoff"]["ema"] for s in old_states])
    projector_keys = {k for k in saved["state_dict"] if k.startswith("repa_projector")}
    assert projector_keys == set(probe.seen["weights"]) and len(projector_keys) == 12
    for key in projector_keys:
        torch.testing.assert_close(probe.seen["weights"][key], saved["state_dict"][key], rtol=0, atol=0)
    assert not [w for w in caught if "REPA" in str(w.message)], "nothing changed, nothing to warn about"
