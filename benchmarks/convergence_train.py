"""One training run of the convergence benchmark: a setting, an arm and a seed.

The arms differ only by the callback. ``aligned``: ``RepaCallback`` as the method's experiment (the
package's Hydra config, ``initialize_config_module("lightning_repa.conf")``) configures it, with the
setting's overrides; ``baseline``: the same config without the callback. Same seed, same
everything: the model's initialisation is seeded by ``model.seed`` inside a forked RNG, the data
order by the loader's own generator, and the global RNG that draws the training noise, times and
label dropout is re-seeded with the run's seed at ``on_train_start``, after the callback built its
projector and teacher (the package draws nothing from it there, tests/test_ab_pairing.py; the re-seed
keeps the benchmark paired even if a future teacher did). Both arms
therefore see the same batches with the same noise; each run records its initial-weight fingerprint
and first training loss so that this is checked. Evaluation draws only from its own generators and
precomputed noise, so it does not change the training trajectory.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from common import isolated
from convergence_eval import EvalData, EvalOptions, build_eval_data, evaluate, reference_probes
from convergence_methods import METHODS, Setting, unconditional

ARMS = ("baseline", "aligned")


@dataclass(frozen=True)
class Job:
    """One training run."""

    setting: Setting
    arm: str
    seed: int
    evals: EvalOptions
    extra: tuple[str, ...] = ()  # Hydra overrides after the setting's (command line, search)
    threads: int = 1
    checkpoint: Optional[str] = None  # save the trained module here (for lightning-repa-probe)

    @property
    def eval_steps(self) -> list[int]:
        """eval_every, 2 eval_every, ... and the last step."""
        s = self.setting
        return sorted({*range(s.eval_every, s.steps + 1, s.eval_every), s.steps})

    @property
    def overrides(self) -> tuple[str, ...]:
        return (*self.setting.overrides, *self.extra)


def compose(experiment: str, seed: int, steps: int, output_dir: str, overrides: Sequence[str] = ()) -> Any:
    """The package's Hydra config of ``experiment`` for one seed and budget (no logger)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        return hydra_compose(config_name="config", overrides=[
            f"experiment={experiment}", f"seed={seed}", f"trainer.max_steps={steps}", "logger=none",
            f"paths.output_dir={output_dir}", *overrides])


def parameter_fingerprint(model: torch.nn.Module, skip_prefix: str = "repa_projector") -> str:
    """SHA-1 of the module's parameters and buffers (names and bytes), the callback's projector left out."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(skip_prefix):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _recorder(job: Job, data: EvalData, block_index: int, repa: Any) -> Any:
    import lightning as L

    spec = METHODS[job.setting.method]

    class ConvergenceRecorder(L.Callback):
        """Re-seeds the global RNG at train start, evaluates at the job's steps and collects each
        step's ``repa/similarity`` and weight (``repa.last_result``, one micro-batch per step)."""

        def __init__(self) -> None:
            self.steps = job.eval_steps
            self.curves: dict[str, list[float]] = {"val_loss": [], "probe": [], "fd": [], "fd_train": []}
            self.probe_t: dict[str, float] = {}
            self.per_step: dict[str, list[float]] = {"similarity": [], "weight": []}
            self.init_fingerprint, self.first_train_loss, self.eval_seconds = "", math.nan, 0.0

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            L.seed_everything(job.seed, verbose=False)  # the same noise stream in both arms
            self.init_fingerprint = parameter_fingerprint(pl_module)

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            step = trainer.global_step  # optimizer steps done
            if step == 1:
                self.first_train_loss = float(trainer.callback_metrics["train/loss"])
            if repa is not None:
                result = repa.last_result
                for key in self.per_step:
                    value = None if result is None else getattr(result, key, None)
                    self.per_step[key].append(math.nan if value is None else float(value))
            if step in self.steps:
                start = time.perf_counter()
                values = evaluate(pl_module, spec, block_index, data, job.evals, job.setting.conditional,
                                  sweep=step == self.steps[-1])
                self.probe_t = values.pop("probe_t", self.probe_t)
                for key, value in values.items():
                    self.curves[key].append(value)
                self.eval_seconds += time.perf_counter() - start

        def step_curve(self, key: str) -> Optional[list[Optional[float]]]:
            """The mean of a per-step value over the steps since the previous evaluation (NaN steps, e.g.
            after a cutoff, left out; None when all are)."""
            if repa is None:
                return None
            values, curve, previous = self.per_step[key], [], 0
            for step in self.steps:
                window = [v for v in values[previous:step] if not math.isnan(v)]
                curve.append(float(np.mean(window)) if window else None)
                previous = step
            return curve

    return ConvergenceRecorder()


def run_job(job: Job) -> dict[str, Any]:
    """Train one arm of one setting and seed; return its curves and checks."""
    with isolated(job.threads):
        return _run_job(job)


def _run_job(job: Job) -> dict[str, Any]:
    import lightning as L
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    import lightning_repa.demo  # noqa: F401  (registers the teacher with timm)
    from lightning_repa import RepaCallback

    spec = METHODS[job.setting.method]
    started, start, cpu_start = time.time(), time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="repa_convergence_") as tmp:
        cfg = compose(spec.experiment, job.seed, job.setting.steps, tmp, job.overrides)
        datamodule = instantiate(cfg.data)
        data = build_eval_data(spec, datamodule, job.evals)  # draws from its own generators only
        L.seed_everything(job.seed, verbose=False)  # then as the app: seed, data, model, trainer
        model_args = OmegaConf.to_container(cfg.model, resolve=True)
        cls = get_class(model_args.pop("_target_"))
        model = (cls if job.setting.conditional else unconditional(cls))(**model_args)
        repa = RepaCallback.from_config(cfg.repa) if job.arm == "aligned" else None
        block_index = -1 if cfg.repa.get("block_index") is None else int(cfg.repa.block_index)
        recorder = _recorder(job, data, block_index, repa)
        trainer = instantiate(cfg.trainer, callbacks=[cb for cb in (repa, recorder) if cb is not None], logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                              limit_val_batches=0, default_root_dir=tmp)
        trainer.fit(model, datamodule=datamodule)
        if job.checkpoint:
            trainer.save_checkpoint(job.checkpoint)
    if trainer.global_step != job.setting.steps:
        raise RuntimeError(f"{job}: trained {trainer.global_step} steps, expected {job.setting.steps}")
    return {
        "setting": job.setting.name, "method": job.setting.method, "arm": job.arm, "seed": job.seed,
        "steps": recorder.steps,
        "curves": {**recorder.curves, "similarity": recorder.step_curve("similarity"),
                   "weight": recorder.step_curve("weight")},
        "probe_t": recorder.probe_t,
        "init_fingerprint": recorder.init_fingerprint, "final_fingerprint": parameter_fingerprint(model),
        "first_train_loss": recorder.first_train_loss,
        "final_train_loss": float(trainer.callback_metrics["train/loss"]),
        "parameters": sum(p.numel() for p in model.parameters()), "block_index": block_index,
        "overrides": list(job.overrides),
        "started": started, "finished": time.time(),
        "seconds": time.perf_counter() - start, "eval_seconds": recorder.eval_seconds,
        "cpu_seconds": time.process_time() - cpu_start,  # this process's CPU time: what a busy machine does not inflate
    }


def run_reference(setting: Setting, evals: EvalOptions, threads: int = 1) -> dict[str, Any]:
    """The reference probes of a method (independent of arm and seed)."""
    import lightning_repa.demo  # noqa: F401
    from hydra.utils import instantiate

    spec = METHODS[setting.method]
    with isolated(threads), tempfile.TemporaryDirectory(prefix="repa_convergence_") as tmp:
        cfg = compose(spec.experiment, 0, setting.steps, tmp, setting.overrides)
        data = build_eval_data(spec, instantiate(cfg.data), evals)
        return reference_probes(data, evals.sweep_ts)
