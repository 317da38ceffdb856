"""The teacher-feature cache: in memory and on disk, each sample's features computed once, equal to
the uncached ones to half precision, refused when made otherwise or when a sample changes, safe
against killed writers and shared by processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import LatentData, Recorder, TinyFlow, trainer
from lightning_repa import RepaCallback
from lightning_repa.maths.align import TeacherTokens
from lightning_repa.teachers.cache import CachedTeacher, DiskStore, MemoryStore, StaleCacheError, fingerprint

HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


class EncoderCalls(L.Callback):
    """Counts the images the callback's encoder sees."""

    def __init__(self, repa: RepaCallback) -> None:
        self.repa, self.images = repa, 0

    def on_fit_start(self, trainer, pl_module):
        def count(module, args, out):
            self.images += args[0].shape[0]

        teacher = getattr(self.repa.teacher, "teacher", self.repa.teacher)  # inside the cache, if any
        teacher.encoder.register_forward_hook(count)


def _fit(steps: int, options: dict, n: int = 6, module: L.LightningModule | None = None, **repa) -> tuple:
    callback = RepaCallback(family="sd3", block_index=1, **options, **repa)
    record, calls = Recorder(callback), EncoderCalls(callback)
    t = trainer(steps, [callback, record, calls])
    t.fit(module or TinyFlow("sd3", lr=0.0), DataLoader(LatentData("sd3", n=n), batch_size=2))
    return callback, record, calls


def _plain_teacher_tokens(options: dict) -> list[torch.Tensor]:
    _, record, _ = _fit(3, options)
    return [record.inputs[k]["teacher"] for k in range(3)]


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_features_equal_the_uncached_ones_and_are_computed_once(cache, repa_options, tmp_path):
    where = dict(cache_dir=str(tmp_path / "cache")) if cache == "disk" else {}
    cached, record, calls = _fit(6, repa_options, cache=cache, **where)  # 2 epochs of 3 batches
    assert calls.images == 6 and cached.teacher.misses == 6 and cached.teacher.hits == 6  # each id encoded once
    plain = _plain_teacher_tokens(repa_options)
    for epoch in (0, 1):
        for k in range(3):
            got, want = record.inputs[3 * epoch + k]["teacher"], plain[k]
            torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)  # exactly the fp16 rounding
    if cache == "disk":  # another run reads the same directory: nothing is encoded again
        again, record2, calls2 = _fit(3, repa_options, cache=cache, **where)
        assert calls2.images == 0 and again.teacher.hits == 6 and again.teacher.misses == 0
        for k in range(3):
            torch.testing.assert_close(record2.inputs[k]["teacher"], record.inputs[k]["teacher"], rtol=0, atol=0)


def test_the_cache_needs_ids_and_an_encoder(repa_options):
    class NoIds(LatentData):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            del item["ids"]
            return item

    class Module(TinyFlow):  # its noise needs ids; the callback sees the batch without them
        def training_step(self, batch, batch_idx):
            return super().training_step({**batch, "ids": torch.zeros(2, dtype=torch.long)}, batch_idx)

    with pytest.raises(KeyError, match=r"stable sample ids from batch\['ids'\].*set `ids_key`"):
        trainer(1, [RepaCallback(family="sd3", block_index=1, cache="memory", **repa_options)]).fit(
            Module("sd3"), DataLoader(NoIds("sd3", n=2), batch_size=2))
    with pytest.raises(ValueError, match=r"teacher=backbone computes its tokens in the same forward"):
        RepaCallback(family="sd3", block_index=0, teacher="backbone", teacher_block_index=2, cache="memory")
    with pytest.raises(ValueError, match=r"`cache=disk` needs `cache_dir`"):
        RepaCallback(family="sd3", cache="disk")
    with pytest.raises(ValueError, match=r"`cache_dir` is only read with cache=disk"):
        RepaCallback(family="sd3", cache="memory", cache_dir="x")
    with pytest.raises(ValueError, match=r"`views_key` is only read with a teacher cache"):
        RepaCallback(family="sd3", views_key="flip")


# --- a cache made otherwise ------------------------------------------------------------------


def _refused(options: dict, match: str, cache_dir: Path) -> None:
    callback = RepaCallback(family="sd3", block_index=1, cache="disk", cache_dir=str(cache_dir), **options)
    record = Recorder(callback)
    with pytest.raises(StaleCacheError, match=match):
        trainer(1, [callback, record]).fit(TinyFlow("sd3"), DataLoader(LatentData("sd3", n=2), batch_size=2))
    assert not record.inputs, "refused at fit start, before any step"


def test_a_cache_made_with_other_settings_is_refused_naming_the_field(repa_options, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    _fit(1, repa_options, n=2, cache="disk", cache_dir=str(cache_dir))
    _refused({**repa_options, "encoder_image_size": 28}, r"encoder_image_size: cached 56, now 28", cache_dir)
    other = tmp_path / "other.pth"  # the same architecture, other weights
    state = torch.load(repa_options["encoder_checkpoint"])
    state["cls_token"] = state["cls_token"] + 1.0
    torch.save(state, other)
    _refused({**repa_options, "encoder_checkpoint": str(other)}, r"encoder_checkpoint_sha256: cached '[0-9a-f]{64}'",
             cache_dir)
    _refused({**repa_options, "pixels_range": [-1.0, 1.0]}, r"pixels_range: cached \[0.0, 1.0\], now \[-1.0, 1.0\]",
             cache_dir)
    import lightning_repa

    monkeypatch.setattr(lightning_repa, "__version__", "99.0")
    _refused(repa_options, r"package_version: cached '0.1.0', now '99.0'.*Use another `cache_dir`", cache_dir)
    monkeypatch.undo()
    _fit(1, repa_options, n=2, cache="disk", cache_dir=str(cache_dir))  # the same settings still open it


# --- killed writers ----------------------------------------------------------------------------

KILLED_WRITER = """
import os, signal, sys, torch
import safetensors.torch
from lightning_repa.teachers.cache import DiskStore

root, where = sys.argv[1], sys.argv[2]
save = safetensors.torch.save_file

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def half_then_die(tensors, path, metadata=None):
    save(tensors, path, metadata=metadata)
    os.truncate(path, os.path.getsize(path) // 2)
    die()

store = DiskStore(root, {"run": 1})
for shard in range(3):
    keys = [f"{shard}-{i}" for i in range(4)]
    assert store.claim(keys) == keys
    if shard == 2 and where == "rename":  # the shard is written, not yet renamed into place
        os.replace = die
    if shard == 2 and where == "write":  # half of the shard is written
        safetensors.torch.save_file = half_then_die
    store.put({k: (torch.full((16, 8), float(shard)), (4, 4), torch.zeros(2)) for k in keys})
"""


@pytest.mark.parametrize("where", ["rename", "write"])
def test_a_writer_killed_while_writing_leaves_the_cache_readable(where, tmp_path):
    root = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root), where], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL
    leftovers = [p.name for p in (root / "shards").iterdir()]
    assert sum(n.startswith(".") for n in leftovers) == 1, leftovers  # the interrupted shard, hidden
    store = DiskStore(root, {"run": 1}, claim_timeout=3600)
    assert len(store) == 8
    entries = store.get([f"{s}-{i}" for s in range(3) for i in range(4)])
    assert sorted(entries) == [f"{s}-{i}" for s in range(2) for i in range(4)]
    for key, (tokens, grid, _) in entries.items():
        assert tokens.dtype == torch.float16 and grid == (4, 4)
        assert torch.equal(tokens, torch.full((16, 8), float(key[0])).half())
    # The dead writer's claims do not block the keys it never wrote: they are taken over.
    assert store.claim(["2-0", "2-1"]) == ["2-0", "2-1"]


def test_a_damaged_shard_is_skipped_with_a_warning(tmp_path):
    store = DiskStore(tmp_path, {"run": 1})
    store.put({"a": (torch.ones(4, 2), (2, 2), torch.zeros(2))})
    (tmp_path / "shards" / "zz-foreign.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.warns(UserWarning, match=r"skipping unreadable shard zz-foreign.safetensors"):
        fresh = DiskStore(tmp_path, {"run": 1})
    assert list(fresh.get(["a"])) == ["a"]


# --- processes sharing one cache ---------------------------------------------------------------

SHARER = """
import json, pathlib, sys, time, torch
from lightning_repa.maths.align import TeacherTokens
from lightning_repa.teachers.cache import CachedTeacher, DiskStore

class Slow:
    embed_dim = 3
    frames_per_latent = None
    def source(self, batch, latents):
        return latents
    def __call__(self, batch, latents, captured=None):
        time.sleep(0.3)  # the other process asks for the same ids meanwhile
        computed.extend(batch["ids"].tolist())
        return TeacherTokens(latents.flatten(1)[:, None, :3].expand(-1, 4, -1), (2, 2))

computed = []
teacher = CachedTeacher(Slow(), DiskStore(sys.argv[1], {"run": 1}), poll=0.02)
ready = pathlib.Path(sys.argv[1]) / "ready"
ready.mkdir(exist_ok=True)
(ready / sys.argv[3]).touch()
while len(list(ready.iterdir())) < 2:  # both processes start together
    time.sleep(0.01)
out = {}
steps = range(6) if sys.argv[3] == "0" else range(5, -1, -1)  # they meet half-way
for step in steps:
    ids = torch.arange(4) + 2 * step  # consecutive batches overlap by two ids
    latents = torch.stack([torch.full((3, 2, 2), float(i)) for i in ids])
    tokens = teacher({"ids": ids}, latents).tokens
    out[step] = tokens[:, 0, 0].tolist()
json.dump({"computed": computed, "out": out, "hits": teacher.hits, "misses": teacher.misses}, open(sys.argv[2], "w"))
"""


@pytest.mark.slow
def test_two_processes_sharing_a_disk_cache_compute_each_sample_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", SHARER, str(tmp_path / "cache"), str(tmp_path / f"{r}.json"), str(r)],
                              env=ENV, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
    runs = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    computed = runs[0]["computed"] + runs[1]["computed"]
    assert sorted(computed) == list(range(14)), "each of the 14 ids computed by exactly one process"
    assert runs[0]["computed"] and runs[1]["computed"], "both processes did some of the work"
    for run in runs:
        assert run["out"] == {str(s): [float(2 * s + i) for i in range(4)] for s in range(6)}, "every id read right"
        assert run["misses"] == len(run["computed"]) and run["hits"] + run["misses"] == 24
    assert not list((tmp_path / "cache" / "claims").iterdir()), "no claim left behind"


@pytest.mark.slow
def test_two_ddp_ranks_sharing_a_disk_cache_compute_each_sample_once(tmp_path, dinov2_checkpoint):
    out = tmp_path / "ranks"
    proc = subprocess.run([sys.executable, str(HERE / "ddp_script.py"), str(out), dinov2_checkpoint, "disk"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["global_step"] == 10, "2 epochs of 5 steps per rank"
    second_epoch = [set(r["ids"][10:]) for r in ranks]
    first_epoch = [set(r["ids"][:10]) for r in ranks]
    assert second_epoch[0] & first_epoch[1], "the shuffle gives rank 0 samples rank 1 cached"
    assert ranks[0]["misses"] + ranks[1]["misses"] == 20, "each of the 20 samples encoded once, by one rank"
    assert ranks[0]["hits"] + ranks[1]["hits"] == 20
    assert len(DiskStore(out / "cache", json.loads((out / "cache" / "meta.json").read_text()))) == 20


# --- augmentation -------------------------------------------------------------------------------


class PixelTeacher:
    """Tokens (B, 4, 3): a pure function of the pixels, counting the samples it computes."""

    embed_dim = 3
    frames_per_latent = None

    def __init__(self) -> None:
        self.computed = 0

    def source(self, batch, latents):
        return batch["pixels"]

    def __call__(self, batch, latents, captured=None):
        self.computed += batch["pixels"].shape[0]
        return TeacherTokens(batch["pixels"].flatten(1)[:, :12].unflatten(1, (4, 3)), (2, 2))


def test_a_sample_that_comes_back_flipped_is_refused_unless_views_are_keyed():
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = {"ids": torch.tensor([0, 1]), "pixels": pixels}
    flipped = {**batch, "pixels": pixels.flip(-1)}
    latents = torch.zeros(2, 4, 2, 2)
    teacher = CachedTeacher(PixelTeacher(), MemoryStore())
    teacher(batch, latents)
    teacher({**batch, "pixels": pixels.to(torch.bfloat16).float()}, latents)  # rounding is the same sample
    with pytest.raises(ValueError, match=r"other images under the ids \['0', '1'\].*set `views_key`"):
        teacher(flipped, latents)
    keyed = CachedTeacher(PixelTeacher(), MemoryStore(), views_key="flip")
    plain = PixelTeacher()
    for _ in range(2):  # two epochs
        for b, flip in ((batch, 0), (flipped, 1)):
            tokens = keyed({**b, "flip": torch.tensor([flip, flip])}, latents).tokens
            torch.testing.assert_close(tokens, plain(b, latents).tokens.half().float(), rtol=0, atol=0)
    assert keyed.teacher.computed == 4 and keyed.hits == 4, "each (id, view) computed once"
    both = {"ids": torch.tensor([0, 0]), "pixels": torch.stack([pixels[0], pixels[0].flip(-1)]),
            "flip": torch.tensor([0, 1])}  # two views of one id in one batch
    tokens = keyed(both, latents).tokens
    torch.testing.assert_close(tokens, plain(both, latents).tokens.half().float(), rtol=0, atol=0)
    assert keyed.teacher.computed == 4, "both views were cached already"
    with pytest.raises(ValueError, match=r"one view id per sample \(2\), distinct for samples of one id"):
        keyed({**both, "flip": torch.tensor([1, 1])}, latents)


def test_fingerprints_separate_flips_and_crops_but_not_rounding():
    x = torch.randn(3, 4, 16, 16)
    base = fingerprint(x)
    from lightning_repa.teachers.cache import same_sample

    assert same_sample(base, fingerprint(x.half())).all()
    assert not same_sample(base, fingerprint(x.flip(-1))).any()
    assert not same_sample(base, fingerprint(torch.roll(x, 2, dims=-1))).any()


# --- precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("precision,expected", [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.bfloat16),
                                                ("32-true", None)])
def test_the_teacher_decodes_and_encodes_under_the_trainers_bf16(precision, expected, repa_options):
    callback = RepaCallback(family="sd3", block_index=1, **repa_options)
    seen = []

    class Spy(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            def look(module, args):
                seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

            callback.teacher.encoder.model.patch_embed.register_forward_pre_hook(look)

    trainer(1, [callback, Spy()], precision=precision).fit(TinyFlow("sd3"), DataLoader(LatentData("sd3", n=2),
                                                                                        batch_size=2))
    assert seen == [expected]
