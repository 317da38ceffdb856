"""`lightning-repa-cache`: the demo's digits precomputed into a disk cache (features equal to the
encoder's own, half precision), resumable after a kill, split between ranks, read by training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import lightning_repa.apps.hydra_config  # noqa: F401  (registers the schemas)
from lightning_repa.apps import precompute as app
from lightning_repa.teachers.cache import CachedTeacher, DiskStore
from lightning_repa.demo import DigitsDataModule
from lightning_repa.encoders import load_encoder
from lightning_repa.apps.hydra_config import demo_teacher_checkpoint
from lightning_repa.apps.train import run as train

TRAIN_SAMPLES = 1617  # the demo's training digits: 25 batches of 64 and one of 17


def _compose(config: str, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        return compose(config_name=config, overrides=list(overrides))


def _cache(tmp_path: Path, *overrides: str) -> dict:
    return app.run(_compose("cache", "experiment=demo", f"repa.cache_dir={tmp_path / 'cache'}",
                            f"paths.output_dir={tmp_path / 'out'}", *overrides))


def test_the_cache_holds_the_encoders_features_of_every_training_digit(tmp_path):
    result = _cache(tmp_path)
    assert result["samples"] == result["computed"] == result["entries"] == TRAIN_SAMPLES
    store = DiskStore(tmp_path / "cache", json.loads((tmp_path / "cache" / "meta.json").read_text()))
    data = DigitsDataModule(image_size=16, batch_size=64)
    data.setup("fit")
    items = [data.train_set[i] for i in range(5)]  # compare with the encoder run here, on the same images
    encoder = load_encoder("vit_tiny_digits_patch2", 16, demo_teacher_checkpoint())
    want = encoder(torch.stack([item["pixels"] for item in items]))  # (5, 64, D)
    got = store.get([str(int(item["ids"])) for item in items])
    for item, tokens in zip(items, want):
        cached, grid, _ = got[str(int(item["ids"]))]
        assert grid == (8, 8)
        torch.testing.assert_close(cached, tokens.half(), rtol=0, atol=0)


def test_a_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    calls = 0
    real = CachedTeacher.__call__

    def dies_on_the_fourth_batch(self, batch, latents, captured=None):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return real(self, batch, latents, captured)

    monkeypatch.setattr(CachedTeacher, "__call__", dies_on_the_fourth_batch)
    options = ("precompute.shard_size=128", "precompute.max_batches=8")  # two batches of 64 per shard, 512 digits
    with pytest.raises(KeyboardInterrupt):
        _cache(tmp_path, *options)
    monkeypatch.undo()
    again = _cache(tmp_path, *options)
    assert again["cached"] == 192, "batches 1-3 were kept (the third, pending in a shard, written on the way out)"
    assert again["computed"] == 8 * 64 - 192 and again["entries"] == 8 * 64
    assert not list((tmp_path / "cache" / "claims").iterdir())


def test_ranks_take_turns_and_together_cover_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = []
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        done.append(_cache(tmp_path, "precompute.max_batches=5"))
    assert done[0]["computed"] == 2 * 64 and done[1]["computed"] == 3 * 64  # batches 1, 3 / 0, 2, 4
    assert done[1]["entries"] == 5 * 64


def test_training_reads_the_precomputed_cache_and_refuses_another_teachers(tmp_path):
    _cache(tmp_path, "precompute.max_batches=3")
    out = train(_compose("config", "experiment=demo", "repa.cache=disk", f"repa.cache_dir={tmp_path / 'cache'}",
                         "trainer.max_steps=2", "logger=none", "sample.enabled=false", "data.batch_size=64",
                         f"paths.output_dir={tmp_path / 'train'}"))
    assert out["global_step"] == 2 and out["metrics"]["repa/similarity"] > 0
    with pytest.raises(ValueError, match=r"encoder_image_size: cached 16, now 32"):
        train(_compose("config", "experiment=demo", "repa.cache=disk", f"repa.cache_dir={tmp_path / 'cache'}",
                       "repa.encoder_image_size=32", "trainer.max_steps=1", "logger=none",
                       f"paths.output_dir={tmp_path / 'train2'}"))


def test_the_app_needs_a_cache_dir_and_a_known_split(tmp_path):
    with pytest.raises(ValueError, match=r"repa.cache_dir"):
        app.run(_compose("cache", "experiment=demo", f"paths.output_dir={tmp_path}"))
    with pytest.raises(ValueError, match=r"`precompute.split` can be train, val, all"):
        _cache(tmp_path, "precompute.split=test")
    with pytest.raises(ValueError, match=r"writes a disk cache: keep repa.cache=disk \(got repa.cache=memory\)"):
        _cache(tmp_path, "repa.cache=memory")


@pytest.mark.slow
def test_the_console_script_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_repa.apps.precompute", "experiment=demo",
                           f"repa.cache_dir={tmp_path / 'cache'}", "precompute.split=val",
                           f"hydra.run.dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "180 samples read, 180 computed, 0 already cached" in proc.stdout, proc.stdout[-2000:]
