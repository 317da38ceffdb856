"""The teacher cache never hands back a wrong target (issue 19, items 2, 3 and 9, and the checksums):
every input of decoding is in a disk cache's metadata, nothing non-finite is stored, a read-only
cache computes what it lacks, and flipped bytes are recomputed, not read."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from torch.utils.data import DataLoader

from helpers import LatentData, Recorder, TinyFlow, TinyVideoFlow, trainer, video_loader
from lightning_repa import RepaCallback, StaleCacheError
from lightning_repa.teachers.cache import DiskStore, MemoryStore


def _kl(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, sample_size=32, **config).eval().requires_grad_(False)


class _WithVAE(TinyFlow):
    def __init__(self, vae) -> None:
        super().__init__("sd3", lr=0.0)
        self.vae = vae


def _cached_fit(module, options: dict, cache_dir: Path, data=None, steps: int = 1, **extra) -> RepaCallback:
    repa = RepaCallback(family="sd3", block_index=1, cache="disk", cache_dir=str(cache_dir), **options, **extra)
    trainer(steps, [repa]).fit(module, DataLoader(data or LatentData("sd3", n=2), batch_size=2))
    return repa


@pytest.mark.parametrize("change", [dict(scaling_factor=0.9), dict(shift_factor=0.2),
                                    dict(latents_mean=[0.1] * 4, latents_std=[2.0] * 4)])
def test_a_vae_config_change_makes_the_cache_stale(change, repa_options, tmp_path):
    options = {**repa_options, "decoder": "vae"}
    _cached_fit(_WithVAE(_kl(scaling_factor=1.5, shift_factor=0.1)), options, tmp_path)
    changed = {"scaling_factor": 1.5, "shift_factor": 0.1, **change}
    key = sorted(change)[0]
    with pytest.raises(StaleCacheError, match=rf"decoder_config\.{key}: cached .*, now .*"):
        _cached_fit(_WithVAE(_kl(**changed)), options, tmp_path)


def test_a_video_vae_stats_change_makes_the_cache_stale(repa_options, tmp_path):
    """Wan: per-channel `latents_mean`/`latents_std` in the VAE's config."""
    from lightning_repa.testing.tiny_video_models import tiny_video_vae

    class WithVAE(TinyVideoFlow):
        def __init__(self, vae) -> None:
            super().__init__("wan", lr=0.0)
            self.vae = vae

    options = {**repa_options, "decoder": "vae"}
    data = video_loader("wan", n=2, thw=(2, 4, 8)).dataset

    def fit(vae):
        repa = RepaCallback(family="wan", block_index=1, cache="disk", cache_dir=str(tmp_path), **options)
        trainer(1, [repa]).fit(WithVAE(vae), DataLoader(data, batch_size=2))

    fit(tiny_video_vae("wan"))
    vae = tiny_video_vae("wan")
    vae.register_to_config(latents_std=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(StaleCacheError, match=r"decoder_config\.latents_std"):
        fit(vae)


def test_the_pixels_range_is_part_of_the_metadata(repa_options, tmp_path):
    data = LatentData("sd3", n=2)
    _cached_fit(TinyFlow("sd3", lr=0.0), repa_options, tmp_path, data)
    with pytest.raises(StaleCacheError, match=r"pixels_range: cached \[0\.0, 1\.0\], now \[-1\.0, 1\.0\]"):
        _cached_fit(TinyFlow("sd3", lr=0.0), {**repa_options, "pixels_range": [-1.0, 1.0]}, tmp_path, data)


class _NaNFirst(LatentData):
    """Sample 0 has a NaN pixel (until `fixed`)."""

    fixed = False

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if i == 0 and not self.fixed:
            item["pixels"][0, 0, 0] = float("nan")
        return item


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_a_nan_sample_is_skipped_and_never_stored(cache, repa_options, tmp_path):
    where = dict(cache_dir=str(tmp_path / "c")) if cache == "disk" else {}
    data = _NaNFirst("sd3", n=4)
    repa = RepaCallback(family="sd3", block_index=1, cache=cache, **where, **repa_options)
    record = Recorder(repa)
    fit = trainer(4, [repa, record])
    with pytest.warns(UserWarning, match="not finite; that step adds no alignment loss"):
        fit.fit(TinyFlow("sd3", lr=0.0), DataLoader(data, batch_size=2))  # 2 epochs: the NaN batch twice
    assert [r.skipped for r in record.results] == [True, False, True, False]
    assert float(fit.callback_metrics["repa/skipped"]) == 2
    store = repa.teacher.store
    entries = store.get([str(i) for i in range(4)])
    assert sorted(entries) == ["1", "2", "3"] and all(e[0].isfinite().all() for e in entries.values())
    if cache == "disk":  # a rerun with the image fixed reads the good entries and computes the fixed one
        data.fixed = True
        again = RepaCallback(family="sd3", block_index=1, cache=cache, **where, **repa_options)
        record = Recorder(again)
        trainer(2, [again, record]).fit(TinyFlow("sd3", lr=0.0), DataLoader(data, batch_size=2))
        assert not any(r.skipped for r in record.results) and again.teacher.misses == 1


def test_a_read_only_cache_computes_what_it_lacks_without_writing(repa_options, tmp_path, monkeypatch):
    cache_dir = tmp_path / "c"
    _cached_fit(TinyFlow("sd3", lr=0.0), repa_options, cache_dir, LatentData("sd3", n=2))  # ids 0, 1
    shards = sorted(os.listdir(cache_dir / "shards"))
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # the directory on a read-only mount (EROFS)
        if str(path).startswith(str(cache_dir)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.warns(UserWarning, match=r"read-only.*computed.*not stored"):
        repa = _cached_fit(TinyFlow("sd3", lr=0.0), repa_options, cache_dir, LatentData("sd3", n=4), steps=4)
    assert repa.teacher.misses == 2 and repa.teacher.hits == 6  # ids 2, 3 computed once, kept in memory
    assert sorted(os.listdir(cache_dir / "shards")) == shards


def test_flipped_bytes_in_a_shard_are_recomputed_not_read(repa_options, tmp_path):
    cache_dir = tmp_path / "c"
    first = _cached_fit(TinyFlow("sd3", lr=0.0), repa_options, cache_dir)
    assert first.teacher.misses == 2
    shard = next((cache_dir / "shards").glob("*.safetensors"))
    with safe_open(shard, "pt") as f:
        last = sorted(f.keys())[-1]
        size = f.get_tensor(last).numel() * f.get_tensor(last).element_size()
    raw = bytearray(shard.read_bytes())
    raw[-size // 2] ^= 0xFF  # one flipped byte in the middle of the last tensor's data
    shard.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"checksum.*recomputed"):
        again = _cached_fit(TinyFlow("sd3", lr=0.0), repa_options, cache_dir)
    assert again.teacher.misses == 1 and again.teacher.hits == 1


def test_memory_and_disk_stores_refuse_non_finite_entries(tmp_path):
    bad = {"a": (torch.tensor([[float("nan"), 1.0]]), (1, 1), torch.zeros(2)),
           "b": (torch.ones(1, 2), (1, 1), torch.tensor([float("inf"), 0.0])),
           "c": (torch.ones(1, 2), (1, 1), torch.zeros(2))}
    for store in (MemoryStore(), DiskStore(tmp_path, {"run": 1})):
        store.put(bad)
        if isinstance(store, DiskStore):
            store.flush()
        assert sorted(store.get(["a", "b", "c"])) == ["c"]
