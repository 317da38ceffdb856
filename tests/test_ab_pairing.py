"""A/B by construction (issue 22, item 10): building and attaching the callback draws nothing from the
run's random generators, so a run with REPA and a run without it, from one seed, see the same batches
in the same order with the same noise; the projector's initialisation is a function of the seed."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers import LatentData, TinyFlow, trainer
from lightning_repa import RepaCallback


class _GlobalNoise(TinyFlow):
    """Draws its noise and times from the global generator, as most training scripts do, and notes
    each step's ids and draws."""

    def __init__(self) -> None:
        super().__init__("sd3", lr=0.0)
        self.seen: list[tuple[list[int], float, float]] = []

    def training_step(self, batch, batch_idx):
        x0 = batch["latents"]
        noise, t = torch.randn_like(x0), torch.rand(x0.shape[0])
        self.seen.append((batch["ids"].tolist(), float(noise.sum()), float(t.sum())))
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pred = self.fam.forward(self.transformer, x_t, t, self.fam.make_cond(x0.shape[0], seed=0))
        return F.mse_loss(pred, noise - x0)


def _run(callbacks: list) -> _GlobalNoise:
    L.seed_everything(7)
    module = _GlobalNoise()
    data = DataLoader(LatentData("sd3", n=12), batch_size=2, shuffle=True)  # the order draws from the seed too
    trainer(5, callbacks).fit(module, data)
    return module


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_a_run_with_the_callback_draws_what_a_run_without_it_draws(lam, repa_options):
    plain = _run([])
    aligned = _run([RepaCallback(family="sd3", block_index=1, lam=lam, **repa_options)])
    assert aligned.seen == plain.seen and len(plain.seen) == 5
    assert [ids for ids, _, _ in plain.seen] != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], "shuffled"


def test_the_projector_starts_from_the_seed(repa_options):
    def first_weights(seed: int) -> torch.Tensor:
        L.seed_everything(seed)
        module = TinyFlow("sd3", lr=0.0)
        trainer(1, [RepaCallback(family="sd3", block_index=1, **repa_options)]).fit(module, DataLoader(
            LatentData("sd3", n=2), batch_size=2))
        return module.repa_projector.body[1].weight.detach().clone()

    torch.testing.assert_close(first_weights(3), first_weights(3), rtol=0, atol=0)
    assert not torch.equal(first_weights(3), first_weights(4))
