"""Schedule, EMA and cutoff inside real training: accumulation, zero-weight skipping, resume,
several processes, and the loggers (SPEC sections 7 and 8)."""

from __future__ import annotations

import csv
import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import lightning_repa.schedule
from helpers import Recorder, TinyFlow, loader, trainer
from lightning_repa import RepaCallback

HERE = Path(__file__).resolve().parent


def test_schedule_docstring_examples():
    assert doctest.testmod(lightning_repa.schedule).failed == 0


def test_ema_advances_once_per_optimizer_step_with_accumulation(repa_options):
    repa = RepaCallback(family="sd3", block_index=1, similarity_ema_decay=0.5, **repa_options)
    record = Recorder(repa)
    trainer(3, [repa, record], accumulate_grad_batches=4).fit(TinyFlow("sd3"), loader("sd3", n=24))
    micro = [float(r.similarity) for r in record.results]
    assert len(micro) == 12 and record.measured_steps() == [0, 1, 2]
    emas = []
    for k, step in enumerate(record.steps):  # the mean over the step's 4 micro-batches
        assert step["similarity"] == pytest.approx(sum(micro[4 * k: 4 * k + 4]) / 4, abs=1e-6)
        emas.append(step["ema"])
    # decay 0.5: the EMA moves once per optimizer step, halfway to that step's similarity
    assert emas[0] == pytest.approx(record.steps[0]["similarity"])
    for k in (1, 2):
        assert emas[k] == pytest.approx((emas[k - 1] + record.steps[k]["similarity"]) / 2)


class _KLModule(TinyFlow):
    def __init__(self) -> None:
        super().__init__("sd3")
        from test_decoders import _tiny_kl

        self.vae = _tiny_kl(scaling_factor=1.0).requires_grad_(False)


def test_no_decode_encode_or_projector_work_while_the_weight_is_zero(repa_options):
    """Weight 0 at warm-up step 0 and from the step cutoff (3) on; 2 steps in between do the work."""
    repa = RepaCallback(family="sd3", block_index=1, warmup_steps=2, cutoff_step=3,
                        **{**repa_options, "decoder": "vae"})
    calls = {"encoder": 0, "decoder": 0, "projector": 0}

    class Count(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            count = lambda key: (lambda *a: calls.__setitem__(key, calls[key] + 1))
            repa.teacher.encoder.register_forward_hook(count("encoder"))
            pl_module.vae.decoder.register_forward_hook(count("decoder"))
            pl_module.repa_projector.register_forward_hook(count("projector"))

    weights = []

    class Weights(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights.append(float(trainer.callback_metrics["repa/weight"]))

    trainer(6, [repa, Count(), Weights()]).fit(_KLModule(), loader("sd3", n=12))
    assert weights == pytest.approx([0.0, 0.25, 0.5, 0.0, 0.0, 0.0])
    assert calls == {"encoder": 2, "decoder": 2, "projector": 2}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _repa_rows(log_dir: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for row in _read_csv(log_dir / "metrics.csv"):
        values = {k: float(v) for k, v in row.items() if k.startswith("repa/") and v != ""}
        if values:
            rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def _resume_run(tmp: Path, options: dict, name: str, max_steps: int, threshold, ckpt_path=None, every=None):
    L.seed_everything(0)
    repa = RepaCallback(family="sd3", block_index=1, lam=1.0, similarity_threshold=threshold,
                        similarity_ema_decay=0.5, **options)
    callbacks = [repa]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=every, save_top_k=-1))
    module = TinyFlow("sd3", lr=3e-2, optimizer="adamw")
    logger = CSVLogger(tmp, name=name)
    trainer(max_steps, callbacks, logger=logger, log_every_n_steps=1, enable_checkpointing=bool(every)).fit(
        module, loader("sd3", n=6), ckpt_path=ckpt_path)
    return module, repa, Path(logger.log_dir)


@pytest.mark.slow
def test_resume_is_exact_with_the_cutoff_after_the_resume_point(tmp_path, repa_options):
    _, probe, probe_dir = _resume_run(tmp_path, repa_options, "probe", 6, None)
    ema = {s: v["repa/similarity_ema"] for s, v in _repa_rows(probe_dir).items()}
    steps = sorted(ema)
    before, after = max(ema[s] for s in steps[:3]), max(ema[s] for s in steps[3:5])
    assert after > before, "premise: the similarity EMA rises after the resume point"
    threshold = (before + after) / 2

    full, full_repa, full_dir = _resume_run(tmp_path, repa_options, "full", 6, threshold)
    assert full_repa.cutoff.tripped_at is not None and full_repa.cutoff.tripped_at >= 3

    _resume_run(tmp_path, repa_options, "first", 3, threshold, every=3)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert ckpt.exists()
    resumed, resumed_repa, resumed_dir = _resume_run(tmp_path, repa_options, "resumed", 6, threshold, ckpt_path=str(ckpt))

    assert resumed_repa.cutoff.state_dict() == full_repa.cutoff.state_dict()
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    full_rows, resumed_rows = _repa_rows(full_dir), _repa_rows(resumed_dir)
    assert sorted(resumed_rows) == [s for s in sorted(full_rows) if s >= min(resumed_rows)]
    for step, values in resumed_rows.items():
        assert values == pytest.approx(full_rows[step], abs=1e-7), step
    assert any(v.get("repa/cutoff") == 1.0 for v in resumed_rows.values())


def test_loggers_receive_repa_series(tmp_path, repa_options, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_logger = WandbLogger(project="lightning-repa-test", save_dir=str(tmp_path), offline=True)
    csv_logger = CSVLogger(tmp_path, name="csv")
    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    trainer(3, [repa], logger=[wandb_logger, csv_logger], log_every_n_steps=1).fit(TinyFlow("sd3"), loader("sd3"))
    wandb_logger.experiment.finish()
    wandb.teardown()  # waits for wandb's service process to exit: it has written the offline run file
    rows = _read_csv(Path(csv_logger.log_dir) / "metrics.csv")
    keys = {"repa/loss", "repa/similarity", "repa/similarity_ema", "repa/weight", "repa/cutoff"}
    assert keys <= set(rows[0])
    assert sum(row["repa/similarity"] != "" for row in rows) == 3
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert [k for k in sorted(keys) if k.encode() not in record] == []


@pytest.mark.slow
def test_two_process_ddp_ranks_agree_and_survive_the_cutoff(tmp_path, dinov2_checkpoint):
    out = tmp_path / "ranks"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_script.py"), str(out), dinov2_checkpoint],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["ids"] and set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"]), "ranks must see different data"
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 5, "the run finishes after the cutoff"
    assert ranks[0]["ema"] == ranks[1]["ema"] and ranks[0]["tripped_at"] == ranks[1]["tripped_at"] is not None
    assert ranks[0]["weights"] == ranks[1]["weights"] and 0.0 in ranks[0]["weights"]
    local = [r["local_similarity"][0] for r in ranks]
    assert local[0] != local[1]
    assert ranks[0]["updates"][0] == pytest.approx(sum(local) / 2, abs=1e-6), "the EMA sees the mean over ranks"
    assert torch.equal(torch.tensor(ranks[0]["projector_sum"]), torch.tensor(ranks[1]["projector_sum"]))


@pytest.mark.slow
def test_two_process_ddp_ranks_skip_a_nonfinite_step_together(tmp_path, dinov2_checkpoint):
    """Only rank 1's first batch has a NaN pixel: both ranks skip step 0's alignment (one decision),
    count it, and end with the same finite projector."""
    out = tmp_path / "ranks"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_script.py"), str(out), dinov2_checkpoint, "nan"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["skipped"] == [True, False, False, False, False] and rank["finite"]
        assert rank["logged_skipped"] == [1.0] * 5
    assert torch.equal(torch.tensor(ranks[0]["projector_sum"]), torch.tensor(ranks[1]["projector_sum"]))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_recoverable_cutoff_keeps_measuring_without_training_the_projector(optimizer, repa_options):
    """While a recoverable cutoff holds the loss off, the similarity is still measured (it is the only
    way back on), but with weight 0 the projector gets no gradient and does not move: not even
    under AdamW, whose momentum and weight decay would move a parameter that has a zero gradient."""
    repa = RepaCallback(family="sd3", block_index=1, similarity_threshold=-1.0, threshold_mode="recoverable",
                        **repa_options)
    record = Recorder(repa)
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append([p.detach().clone() for p in pl_module.repa_projector.parameters()])

    module = TinyFlow("sd3", optimizer=optimizer)
    trainer(4, [repa, record, Snap()]).fit(module, loader("sd3"))
    assert not torch.equal(snapshots[0][1], record.initial["body.1.weight"])  # step 0 (on) trained it
    assert record.measured_steps() == [0, 1, 2, 3]  # measured every step, also while off
    assert [s["logged"]["repa/weight"] for s in record.steps] == [0.5, 0.0, 0.0, 0.0]
    assert not repa.cutoff.is_active(4) and repa.cutoff.tripped_at is None
    for later in snapshots[1:]:  # off from step 1 on: the projector stays where step 0 left it
        assert all(torch.equal(a, b) for a, b in zip(snapshots[0], later))
