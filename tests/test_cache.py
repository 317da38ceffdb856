"""The in-memory teacher-feature cache: the features each sample id gets, computed once."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import LatentData, Recorder, TinyFlow, trainer
from lightning_repa import RepaCallback


def test_cached_features_equal_the_uncached_ones_and_are_computed_once(repa_options):
    seen = []
    cached = RepaCallback(family="sd3", block_index=1, cache="memory", **repa_options)
    record = Recorder(cached)

    class Hook(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            cached.teacher.teacher.encoder.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))

    trainer(6, [cached, record, Hook()]).fit(TinyFlow("sd3", lr=0.0), DataLoader(LatentData("sd3", n=6), batch_size=2))
    # 2 epochs of 3 batches
    assert sum(seen) == 6 and cached.teacher.misses == 6 and cached.teacher.hits == 6  # each id encoded once
    plain = RepaCallback(family="sd3", block_index=1, **repa_options)
    plain_record = Recorder(plain)
    trainer(3, [plain, plain_record]).fit(TinyFlow("sd3", lr=0.0), DataLoader(LatentData("sd3", n=6), batch_size=2))
    for epoch in (0, 1):
        for k in range(3):
            got, want = record.inputs[3 * epoch + k]["teacher"], plain_record.inputs[k]["teacher"]
            torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)  # exactly the fp16 rounding
    assert record.inputs[0]["grid_t"] == plain_record.inputs[0]["grid_t"]


def test_the_cache_needs_ids_and_an_encoder(repa_options):
    class NoIds(LatentData):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            del item["ids"]
            return item

    class Module(TinyFlow):
        def training_step(self, batch, batch_idx):
            return super().training_step({**batch, "ids": torch.zeros(2, dtype=torch.long)}, batch_idx)

    with pytest.raises(KeyError, match=r"stable sample ids from batch\['ids'\].*set `ids_key`"):
        trainer(1, [RepaCallback(family="sd3", block_index=1, cache="memory", **repa_options)]).fit(
            Module("sd3"), DataLoader(NoIds("sd3", n=2), batch_size=2))
    with pytest.raises(ValueError, match=r"teacher=backbone computes its tokens in the same forward"):
        RepaCallback(family="sd3", block_index=0, teacher="backbone", teacher_block_index=2, cache="memory")
    with pytest.raises(NotImplementedError, match=r"cache='disk' is not available yet"):
        RepaCallback(family="sd3", cache="disk")
