"""Does REPA make the demo DiT converge faster? Training curves with and without the callback.

The demo's class-conditional rectified-flow PixArt DiT (``FlowMatchingDiT``, ``experiment=demo``)
is trained from scratch on scikit-learn's digits (``DigitsDataModule``, the 180 held-out digits of
split 0 are never trained on) in two arms that differ only by the callback:

- ``repa``: ``RepaCallback`` exactly as ``experiment=demo`` configures it (family pixart, block 2,
  lam 0.5, the shipped digits ViT ``vit_tiny_digits_patch2`` as teacher, pixels decoder, constant
  schedule, no warm-up): the Hydra config is composed from the package's own ``conf/``, so the
  benchmark follows the demo;
- ``baseline``: the same config without the callback (no projector: fewer parameters).

Same seed, same everything: the DiT's initialisation is seeded by ``model.seed`` inside a forked
RNG (so the projector, built later from the global RNG, cannot change it), the data order by the
loader's own generator, and the global RNG that draws the training noise, times and label dropout
is re-seeded with the run's seed at ``on_train_start``, after the callback built its projector and
teacher (which draw from it). Both arms therefore see the same batches with the same noise; the
JSON records each run's initial-weight fingerprint and first training loss so this can be
checked. Evaluation only uses dedicated ``torch.Generator`` s and precomputed noise, so it does
not change the training trajectory.

Every ``--eval-every`` optimizer steps (and at step 0) a callback records, in eval mode under
``no_grad``:

``val_loss``
    the denoising loss on the 180 held-out digits, with the fixed noise and times of the demo's
    ``validation_step`` (batch ``i`` of 64 draws from a generator seeded ``1000 + i``), averaged
    over ``--val-repeats`` such draws (repeat ``r`` adds ``10_000 * r`` to the seed; repeat 0 is
    ``validation_step``'s own).
``probe``
    linear-probe accuracy of the aligned block's token-averaged features (block 2, as the
    package's probe pools them) at ``t = 0.5`` with the NULL label (``NULL_CLASS``) and fixed noise:
    a multinomial logistic regression (standardised features, L2, C = 1, lbfgs: deterministic) is
    fit on the features of the training digits (``--probe-train`` of them, default all 1,617) and
    scored on the 180 held-out digits. Fitting on the training split (rather than on half of the
    180) gives the probe ten times more examples and scores every held-out digit.
``fd`` / ``fd_train``
    Fréchet distance in the teacher's feature space (its pre-logits: the average of its final
    normed patch tokens, 64-d) between ``--fd-samples`` generated digits and the 180 held-out
    digits (``fd``), and the 1,617 training digits (``fd_train``: a larger, less noisy reference).
    The samples come from a ``--sample-steps`` Euler ODE solve from one fixed noise tensor
    (``--sample-seed``), the same for every arm, seed and evaluation; conditional runs draw the
    classes ``i % 10`` with guidance ``--guidance`` (1: the plain conditional model), unconditional
    runs the NULL label.
``similarity``
    the callback's ``repa/similarity`` (mean cosine of projected and teacher tokens on the training
    batch; read each step from ``repa.last_result``, the same value with one micro-batch per step on
    one device), averaged over the optimizer steps since the previous evaluation (at step 0: step
    0's). None for the baseline, which has no projector.
``similarity_null``
    the same cosine on the 180 held-out digits, from the probe's forward (``t = 0.5``, fixed noise,
    the NULL label) through the run's projector, against the teacher's tokens of the clean digits:
    what the image alone gives the aligned block. In the conditional setting ``repa/similarity`` is
    measured with the label (90 % of training batches), and the demo teacher's patch tokens are
    largely predictable from the label; this one is not. None for the baseline.

Reference probes, once (they depend on neither arm nor seed): the same probe on the raw noisy
input ``x_t`` itself (flattened, 256-d) and on the clean image, and on the teacher's pre-logits
of the clean image. Features that do not beat their own input have learned little.

Two settings: ``conditional`` (the demo) and ``unconditional`` (every training label replaced by
``NULL_CLASS``; validation and sampling with the NULL label). For each metric, the JSON gives
``steps_to_baseline_final``: the first evaluated step at which the REPA arm reaches the final
value of the baseline of the same seed (lower is better for losses and distances), per seed, their
mean (None unless every seed reached it) and the same on the seed-mean curves.

    python benchmarks/convergence.py --json docs/convergence.json --plot docs/convergence.png
    python benchmarks/convergence.py --quick                      # a tiny run exercising every path
    python benchmarks/convergence.py --settings conditional --seeds 0 1 --steps 1200 \\
        --override repa.lam=1.0                                   # Hydra overrides of experiment=demo
    python benchmarks/convergence.py --from-json docs/convergence.json --plot curves.png  # table, plot again

The 12 runs of the default size (3 seeds, 2 arms, 2 settings, 400 steps, 9 evaluations each) are
spread over ``--workers`` processes, one torch (and BLAS) thread each; they need about 45 CPU
minutes, so about 23 minutes on two free cores (the JSON records each run's wall and CPU time).
Nothing is written unless ``--json`` / ``--plot`` say where.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the package of this checkout, whatever is installed

ARMS = ("baseline", "repa")
SETTINGS = ("conditional", "unconditional")
METRICS = ("val_loss", "probe", "fd", "fd_train", "similarity", "similarity_null")
HIGHER_IS_BETTER = {"val_loss": False, "probe": True, "fd": False, "fd_train": False, "similarity": True,
                    "similarity_null": True}
REPA_ONLY = ("similarity", "similarity_null")  # the baseline has no projector: None
COMPARED = ("val_loss", "probe", "fd", "fd_train")  # metrics the baseline has too
LABELS = {
    "val_loss": "held-out denoising loss",
    "probe": "linear probe, block features (t=0.5)",
    "fd": "FD vs held-out (teacher space)",
    "fd_train": "FD vs train digits (teacher space)",
    "similarity": "repa/similarity",
    "similarity_null": "held-out, NULL label, t=0.5",
}
PANELS = ("val_loss", "probe", "fd", "fd_train", "similarity")  # similarity_null shares the similarity panel
_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_repa")
# Lightning's notes about the in-memory demo data and short runs; not about this benchmark.
_QUIET = (r".*does not have many workers.*", r".*is smaller than the logging interval.*", r".*LeafSpec.*",
          r".*`training_step` returns.*", r".*lbfgs failed to converge.*")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EvalOptions:
    """How each evaluation is made (the same for every run of a benchmark)."""

    probe_t: float = 0.5  # flow time of the probe's noisy input (0: clean, 1: noise)
    probe_seed: int = 0  # seeds the probe's fixed noise
    probe_train: int = 0  # training digits the probe is fit on (0: all 1,617)
    val_repeats: int = 2  # fixed noise draws of the held-out loss
    fd_samples: int = 300  # generated digits per evaluation
    sample_steps: int = 8  # Euler steps of the sampler
    guidance: float = 1.0  # classifier-free guidance of conditional sampling (1: none)
    sample_seed: int = 0  # seeds the sampler's fixed noise
    batch_size: int = 128  # evaluation batch size


@dataclass(frozen=True)
class Job:
    """One training run: a setting, an arm and a seed."""

    setting: str
    arm: str
    seed: int
    steps: int
    eval_every: int
    evals: EvalOptions
    overrides: tuple[str, ...] = ()
    threads: int = 1

    @property
    def eval_steps(self) -> list[int]:
        """0, eval_every, 2 eval_every, ... and the last step."""
        return sorted({*range(0, self.steps + 1, self.eval_every), self.steps})


def compose_demo(seed: int, steps: int, output_dir: str, overrides: Sequence[str] = ()) -> Any:
    """The ``experiment=demo`` config of the package's Hydra app, for one seed and budget."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        return compose(
            config_name="config",
            overrides=["experiment=demo", f"seed={seed}", f"trainer.max_steps={steps}", "logger=none",
                       f"paths.output_dir={output_dir}", *overrides],
        )


# --------------------------------------------------------------------------- evaluation data


@dataclass
class EvalData:
    """Everything an evaluation reads that does not depend on the run: images, labels, fixed noise and
    the teacher's feature statistics of the references. Images are in [0, 1], (N, 1, S, S)."""

    val_images: torch.Tensor  # (180, 1, S, S)
    val_labels: torch.Tensor  # (180,)
    train_images: torch.Tensor  # (Ntr, 1, S, S): the probe's training digits
    train_labels: torch.Tensor  # (Ntr,)
    probe_noise_val: torch.Tensor  # (180, 1, S, S)
    probe_noise_train: torch.Tensor  # (Ntr, 1, S, S)
    sample_noise: torch.Tensor  # (fd_samples, 1, S, S)
    reference_stats: dict[str, tuple[np.ndarray, np.ndarray]]  # "fd" / "fd_train" -> (mu (D,), sigma (D, D))
    teacher: torch.nn.Module = field(repr=False)


def teacher_features(teacher: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The teacher's pre-logits (the mean of its final normed patch tokens) of images (N, 1, S, S) in
    [0, 1]: (N, D) float64."""
    from lightning_repa.demo import normalize_for_teacher

    out = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            tokens = teacher.forward_features(normalize_for_teacher(chunk))  # (B, 1 + M, D)
            out.append(teacher.forward_head(tokens, pre_logits=True).double())  # (B, D)
    return torch.cat(out).numpy()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D)."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (FID's formula)."""
    from scipy import linalg

    (mu_a, s_a), (mu_b, s_b) = a, b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's note on a near-singular product, handled below
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():  # regularise as FID implementations do
            eps = np.eye(len(mu_a)) * 1e-6
            covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))


_EVAL_DATA: dict[tuple, EvalData] = {}  # per process: the runs of a worker share it


def build_eval_data(datamodule: Any, options: EvalOptions) -> EvalData:
    """Held-out and training digits of the demo's split, the fixed noises and the reference statistics
    (built once per process for each split and options: they depend on neither arm nor seed)."""
    key = (options, datamodule.image_size, datamodule.val_fraction, datamodule.split_seed)
    if key not in _EVAL_DATA:
        _EVAL_DATA[key] = _build_eval_data(datamodule, options)
    return _EVAL_DATA[key]


def _build_eval_data(datamodule: Any, options: EvalOptions) -> EvalData:
    from lightning_repa.demo import load_teacher_classifier

    datamodule.setup("fit")
    val, train = datamodule.val_set, datamodule.train_set
    val_images, val_labels = val.images, val.labels  # (180, 1, S, S) in [0, 1], (180,)
    n_train = len(train.labels) if options.probe_train <= 0 else min(options.probe_train, len(train.labels))
    pick = torch.linspace(0, len(train.labels) - 1, n_train).round().long()  # evenly spread, deterministic
    train_images, train_labels = train.images[pick], train.labels[pick]
    gen = torch.Generator().manual_seed(options.probe_seed)
    probe_noise_val = torch.randn(val_images.shape, generator=gen)
    probe_noise_train = torch.randn(train_images.shape, generator=gen)
    sample_noise = torch.randn((options.fd_samples, *val_images.shape[1:]),
                               generator=torch.Generator().manual_seed(options.sample_seed))
    teacher = load_teacher_classifier()
    stats = {"fd": gaussian_stats(teacher_features(teacher, val_images)),
             "fd_train": gaussian_stats(teacher_features(teacher, train.images))}
    return EvalData(val_images, val_labels, train_images, train_labels, probe_noise_val, probe_noise_train,
                    sample_noise, stats, teacher)


# --------------------------------------------------------------------------- metrics


def null_labels(labels: torch.Tensor) -> torch.Tensor:
    """Every label replaced by the NULL class (B,)."""
    from lightning_repa.demo.module import NULL_CLASS

    return torch.full_like(labels, NULL_CLASS)


def validation_loss(model: Any, images: torch.Tensor, labels: torch.Tensor, repeats: int,
                    batch_size: int = 64) -> float:
    """The demo's ``validation_step`` loss over the held-out digits (batches of ``batch_size`` in order,
    batch ``i`` drawing its times and noise from a generator seeded ``1000 + i``), the mean over
    ``repeats`` draws (repeat ``r``: seed ``1000 + i + 10_000 r``), weighted by batch size."""
    total, count = 0.0, 0
    for r in range(repeats):
        for i, start in enumerate(range(0, len(labels), batch_size)):
            x0 = images[start:start + batch_size] * 2.0 - 1.0  # (B, 1, S, S) in [-1, 1]
            gen = torch.Generator().manual_seed(1000 + i + 10_000 * r)
            loss = model._loss({"latents": x0, "labels": labels[start:start + batch_size]}, generator=gen)
            total, count = total + float(loss) * len(x0), count + len(x0)
    return total / count


class _StopForward(Exception):
    """Raised by a hook once the probed block has run: nothing after it is needed."""


def block_tokens(model: Any, block_index: int, images: torch.Tensor, noise: torch.Tensor, t: float,
                 batch_size: int) -> torch.Tensor:
    """Image tokens (N, T, D) of block ``block_index`` of the module's denoiser on ``x_t = (1 - t) x0 +
    t noise`` with the NULL label, captured as the callback and the package's probe capture them
    (``BlockCapture``); the forward stops after that block."""
    from lightning_repa.capture import BlockCapture
    from lightning_repa.families import get_family
    from lightning_repa.probe import demo_forward, rectified_flow

    family = get_family("pixart")
    denoiser = model.transformer
    capture = BlockCapture(denoiser, family, [block_index])
    capture.attach()
    stop = family.block_modules(denoiser)[block_index][1].register_forward_hook(_raise_stop)  # after the capture's
    out = []
    try:
        for x0, eps in zip(images.split(batch_size), noise.split(batch_size)):
            x0 = x0 * 2.0 - 1.0  # (B, 1, S, S) in [-1, 1]
            tt = torch.full((len(x0),), t)
            capture.arm(math.prod(family.grid(x0.shape, denoiser)), with_grad=False)
            try:
                batch = {"labels": null_labels(torch.zeros(len(x0), dtype=torch.long))}
                demo_forward(model, rectified_flow(x0, eps, tt), tt, batch)
            except _StopForward:
                pass
            out.append(capture.take(block_index))  # (B, T, D)
    finally:
        stop.remove()
        capture.detach()
    return torch.cat(out)


def pooled(tokens: torch.Tensor) -> np.ndarray:
    """Token-averaged features (N, D), float64, as the package's probe pools them, of tokens (N, T, D)."""
    return tokens.double().mean(dim=1).numpy()


def _raise_stop(module: torch.nn.Module, args: tuple, output: Any) -> None:
    raise _StopForward


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised features, L2, C = 1,
    lbfgs) fit on (train_x (N, D), train_y (N,)): deterministic."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs's ConvergenceWarning on an untrained model's features
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        clf.fit(train_x, train_y)
        return float(clf.score(test_x, test_y))


def euler_sample(model: Any, noise: torch.Tensor, labels: torch.Tensor, steps: int, guidance: float,
                 batch_size: int) -> torch.Tensor:
    """The demo's sampler (``FlowMatching.sample``: Euler from t = 1 to 0, classifier-free guidance)
    from given noise (N, 1, S, S); guidance 1 makes one (conditional) pass per step. Returns (N, 1,
    S, S) in [0, 1]."""
    from lightning_repa.demo.module import NULL_CLASS

    ts = torch.linspace(1.0, 0.0, steps + 1)
    out = []
    for x, y in zip(noise.split(batch_size), labels.split(batch_size)):
        n = len(x)
        for i in range(steps):
            t = ts[i].expand(n)
            if guidance == 1.0:
                v = model(x, t, y)
            else:
                both = torch.cat([y, torch.full_like(y, NULL_CLASS)])
                v_cond, v_uncond = model(torch.cat([x, x]), t.repeat(2), both).chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            x = x + (ts[i + 1] - ts[i]) * v  # dt < 0: towards the data
        out.append(((x + 1.0) / 2.0).clamp(0.0, 1.0))
    return torch.cat(out)


def reference_probes(data: EvalData, t: float) -> dict[str, float]:
    """The probe on the inputs themselves: the noisy x_t flattened, the clean image flattened, and the
    teacher's pre-logits of the clean image (what the aligned features are pulled towards)."""
    def noisy(images: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
        return ((1.0 - t) * (images * 2.0 - 1.0) + t * noise).flatten(1).double().numpy()  # (N, S*S)

    ytr, yva = data.train_labels.numpy(), data.val_labels.numpy()
    return {
        "noisy_input": probe_accuracy(noisy(data.train_images, data.probe_noise_train), ytr,
                                      noisy(data.val_images, data.probe_noise_val), yva),
        "clean_input": probe_accuracy(data.train_images.flatten(1).double().numpy(), ytr,
                                      data.val_images.flatten(1).double().numpy(), yva),
        "teacher_clean": probe_accuracy(teacher_features(data.teacher, data.train_images), ytr,
                                        teacher_features(data.teacher, data.val_images), yva),
    }


@dataclass
class Alignment:
    """What the REPA arm's held-out similarity needs: the callback (its objective and the name of the
    projector on the module), the student's token grid and the teacher's tokens of the clean held-out
    digits (N, M, D) on its grid."""

    repa: Any
    student_grid: tuple[int, ...]
    teacher_tokens: torch.Tensor
    teacher_grid: tuple[int, ...]

    @classmethod
    def build(cls, repa: Any, cfg_repa: Any, model: Any, images: torch.Tensor) -> "Alignment":
        """For images (N, 1, S, S) in [0, 1], with the encoder the callback is configured with."""
        from lightning_repa.encoders import load_encoder
        from lightning_repa.families import get_family

        encoder = load_encoder(cfg_repa.encoder, image_size=cfg_repa.encoder_image_size,
                               checkpoint=cfg_repa.encoder_checkpoint).eval()
        with torch.no_grad():
            tokens = encoder(images.expand(-1, 3, -1, -1))  # (N, M, D), as decoder=pixels hands them over
        student_grid = tuple(get_family(cfg_repa.family).grid(tuple(images.shape), model.transformer))
        return cls(repa, student_grid, tokens, tuple(encoder.grid_for(*images.shape[-2:])))

    def similarity(self, model: Any, student: torch.Tensor) -> float:
        """Mean cosine of the projected student tokens (N, T, D) and the teacher's, as the callback's
        objective computes ``repa/similarity``."""
        projector = getattr(model, self.repa.projector_attr)
        return float(self.repa.objective(student, self.student_grid, self.teacher_tokens, self.teacher_grid,
                                         projector).similarity)


def evaluate(model: Any, data: EvalData, options: EvalOptions, block_index: int, conditional: bool,
             alignment: Optional[Alignment] = None) -> dict[str, float]:
    """val_loss, probe, fd, fd_train (and similarity_null with ``alignment``) of the module as it is now
    (eval mode, no_grad; the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            val_labels = data.val_labels if conditional else null_labels(data.val_labels)
            out = {"val_loss": validation_loss(model, data.val_images, val_labels, options.val_repeats)}
            ftr = pooled(block_tokens(model, block_index, data.train_images, data.probe_noise_train, options.probe_t,
                                      options.batch_size))
            tva = block_tokens(model, block_index, data.val_images, data.probe_noise_val, options.probe_t,
                               options.batch_size)  # (180, T, D)
            out["probe"] = probe_accuracy(ftr, data.train_labels.numpy(), pooled(tva), data.val_labels.numpy())
            if alignment is not None:
                out["similarity_null"] = alignment.similarity(model, tva)
            n = len(data.sample_noise)
            labels = torch.arange(n) % 10 if conditional else null_labels(torch.zeros(n).long())
            samples = euler_sample(model, data.sample_noise, labels, options.sample_steps, options.guidance,
                                   options.batch_size)
            generated = gaussian_stats(teacher_features(data.teacher, samples))
            for key, reference in data.reference_stats.items():
                out[key] = frechet_distance(generated, reference)
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- training


def parameter_fingerprint(model: torch.nn.Module, skip_prefix: str = "repa_projector") -> str:
    """SHA-1 of the module's parameters and buffers (names and bytes), the callback's projector left out."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(skip_prefix):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _make_recorder(job: Job, data: EvalData, block_index: int, repa: Any, cfg_repa: Any) -> Any:
    import lightning as L

    class ConvergenceRecorder(L.Callback):
        """Re-seeds the global RNG at train start, evaluates at the job's steps and collects each
        step's similarity (``repa.last_result``; the callback writes ``repa/similarity`` to the loggers
        every ``log_every_n_steps`` only)."""

        def __init__(self) -> None:
            self.steps = job.eval_steps
            self.curves: dict[str, list[float]] = {m: [] for m in METRICS if m not in REPA_ONLY}
            if repa is not None:
                self.curves["similarity_null"] = []
            self.step_similarity: list[float] = []
            self.alignment: Optional[Alignment] = None
            self.init_fingerprint = ""
            self.first_train_loss = math.nan
            self.eval_seconds = 0.0

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if repa is not None:  # loading the encoder draws from the global RNG: before re-seeding
                self.alignment = Alignment.build(repa, cfg_repa, pl_module, data.val_images)
            L.seed_everything(job.seed, verbose=False)  # the same noise stream in both arms
            self.init_fingerprint = parameter_fingerprint(pl_module)
            self._evaluate(pl_module)

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            step = trainer.global_step  # optimizer steps done
            if step == 1:
                self.first_train_loss = float(trainer.callback_metrics["train/loss"])
            if repa is not None:  # one micro-batch per step on one device: what `repa/similarity` logs
                result = repa.last_result
                if result is None or result.step != step - 1 or result.similarity is None:
                    raise RuntimeError(f"no repa/similarity for step {step - 1}")
                self.step_similarity.append(float(result.similarity))
            if step in self.steps:
                self._evaluate(pl_module)

        def _evaluate(self, pl_module: L.LightningModule) -> None:
            start = time.perf_counter()
            values = evaluate(pl_module, data, job.evals, block_index, job.setting == "conditional", self.alignment)
            for key, value in values.items():
                self.curves[key].append(value)
            self.eval_seconds += time.perf_counter() - start

        def similarity_curve(self) -> Optional[list[float]]:
            """The mean similarity over the steps since the previous evaluation (step 0: step 0's)."""
            if repa is None:
                return None
            sims, curve, previous = self.step_similarity, [], 0
            for step in self.steps:
                window = sims[:1] if step == 0 else sims[previous:step]
                curve.append(float(np.mean(window)))
                previous = step
            return curve

    return ConvergenceRecorder()


def _null_label_module(cls: type) -> type:
    """``cls`` trained unconditionally: every training label becomes NULL_CLASS (label dropout still
    draws its random numbers, so the RNG stream matches the conditional setting's)."""

    class Unconditional(cls):  # type: ignore[misc, valid-type]
        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return super().training_step({**batch, "labels": null_labels(batch["labels"])}, batch_idx)

    Unconditional.__name__ = Unconditional.__qualname__ = f"Unconditional{cls.__name__}"
    return Unconditional


def _quiet() -> None:
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)


@contextmanager
def _isolated(threads: int) -> Iterator[None]:
    """Run a job with ``threads`` torch and BLAS/OpenMP threads (sklearn's lbfgs with two BLAS threads
    on two busy cores is 100x slower than with one), quiet, and leave the caller's thread counts, RNG
    states, seed environment, warning filters and log levels as they were (``run_job`` also runs in
    the caller's process: tests, ``--workers 1``)."""
    import lightning  # noqa: F401  (its import sets its loggers' levels: before ours)
    from threadpoolctl import threadpool_limits

    torch_threads, env = torch.get_num_threads(), dict(os.environ)
    rng = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    loggers = {name: logging.getLogger(name).level for name in _LOGGERS}
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads), warnings.catch_warnings():
            _quiet()
            yield
    finally:
        torch.set_num_threads(torch_threads)
        torch.random.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        for name in set(os.environ) - set(env):
            del os.environ[name]
        os.environ.update(env)
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)


def run_job(job: Job) -> dict[str, Any]:
    """Train one arm of one setting and seed with the demo's config; return its curves and checks."""
    with _isolated(job.threads):
        return _run_job(job)


def _run_job(job: Job) -> dict[str, Any]:
    import lightning as L
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    import lightning_repa.demo  # noqa: F401  (registers the teacher with timm)
    from lightning_repa import RepaCallback

    start, cpu_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="repa_convergence_") as tmp:
        cfg = compose_demo(job.seed, job.steps, tmp, job.overrides)
        datamodule = instantiate(cfg.data)
        # Before seeding: building it draws from the global RNG (the teacher's init) in a worker's first run
        # only, and the projector, initialised from the global RNG in `setup`, must not depend on that.
        data = build_eval_data(datamodule, job.evals)
        L.seed_everything(job.seed, verbose=False)  # then as the app: seed, data, model, trainer
        model_args = OmegaConf.to_container(cfg.model, resolve=True)
        cls = get_class(model_args.pop("_target_"))
        model = (cls if job.setting == "conditional" else _null_label_module(cls))(**model_args)
        repa = RepaCallback.from_config(cfg.repa) if job.arm == "repa" else None
        block_index = int(cfg.repa.block_index)
        recorder = _make_recorder(job, data, block_index, repa, cfg.repa)
        trainer = instantiate(
            cfg.trainer, callbacks=[cb for cb in (repa, recorder) if cb is not None], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, default_root_dir=tmp,
        )
        trainer.fit(model, datamodule=datamodule)
    if trainer.global_step != job.steps:
        raise RuntimeError(f"{job}: trained {trainer.global_step} steps, expected {job.steps}")
    curves = {"similarity_null": None, **recorder.curves, "similarity": recorder.similarity_curve()}
    return {
        "setting": job.setting, "arm": job.arm, "seed": job.seed, "steps": recorder.steps, "curves": curves,
        "init_fingerprint": recorder.init_fingerprint, "final_fingerprint": parameter_fingerprint(model),
        "first_train_loss": recorder.first_train_loss,
        "final_train_loss": float(trainer.callback_metrics["train/loss"]),
        "parameters": sum(p.numel() for p in model.parameters()), "block_index": block_index,
        "seconds": time.perf_counter() - start, "eval_seconds": recorder.eval_seconds,
        "cpu_seconds": time.process_time() - cpu_start,  # this process's CPU time: what a busy machine does not inflate
    }


def run_reference(job: Job) -> dict[str, float]:
    """The reference probes (independent of arm and seed)."""
    import lightning_repa.demo  # noqa: F401
    from hydra.utils import instantiate

    with _isolated(job.threads), tempfile.TemporaryDirectory(prefix="repa_convergence_") as tmp:
        cfg = compose_demo(job.seed, job.steps, tmp, job.overrides)
        data = build_eval_data(instantiate(cfg.data), job.evals)
    return reference_probes(data, job.evals.probe_t)


# --------------------------------------------------------------------------- summary


def steps_to_reach(steps: Sequence[int], curve: Sequence[float], target: float,
                   higher_is_better: bool) -> Optional[int]:
    """The first step whose value reaches ``target`` (>= when higher is better, else <=); None if none does."""
    for step, value in zip(steps, curve):
        if (value >= target) if higher_is_better else (value <= target):
            return int(step)
    return None


def _stats(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {"per_seed": [float(v) for v in arr], "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def summarize_setting(runs: list[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Curves per arm and seed, final values and ``steps_to_baseline_final`` of one setting."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    steps = by[("baseline", seeds[0])]["steps"]
    curves = {arm: {str(s): by[(arm, s)]["curves"] for s in seeds} for arm in ARMS}
    final: dict[str, dict[str, Any]] = {}
    reach: dict[str, Any] = {}
    for metric in METRICS:
        final[metric] = {arm: (None if curves[arm][str(seeds[0])][metric] is None else
                               _stats([curves[arm][str(s)][metric][-1] for s in seeds])) for arm in ARMS}
    for metric in COMPARED:
        higher = HIGHER_IS_BETTER[metric]
        per_seed = {str(s): steps_to_reach(steps, curves["repa"][str(s)][metric],
                                           curves["baseline"][str(s)][metric][-1], higher) for s in seeds}
        reached = [v for v in per_seed.values() if v is not None]
        mean_repa = np.mean([curves["repa"][str(s)][metric] for s in seeds], axis=0)
        mean_base_final = float(np.mean([curves["baseline"][str(s)][metric][-1] for s in seeds]))
        on_mean = steps_to_reach(steps, mean_repa.tolist(), mean_base_final, higher)
        reach[metric] = {
            "per_seed": per_seed,
            "mean": float(np.mean(reached)) if len(reached) == len(seeds) else None,
            "reached": len(reached),
            "mean_curves": on_mean,
            "speedup_mean_curves": steps[-1] / on_mean if on_mean else None,  # baseline's steps / REPA's
        }
    for metric in REPA_ONLY:
        reach[metric] = None  # the baseline has no projector, so no similarity to reach
    checks = {
        "same_init": all(by[("baseline", s)]["init_fingerprint"] == by[("repa", s)]["init_fingerprint"] for s in seeds),
        "same_first_loss": all(by[("baseline", s)]["first_train_loss"] == by[("repa", s)]["first_train_loss"]
                               for s in seeds),
    }
    kept = ("init_fingerprint", "final_fingerprint", "first_train_loss", "final_train_loss", "parameters", "seconds",
            "eval_seconds", "cpu_seconds")
    runs_meta = {arm: {str(s): {k: by[(arm, s)][k] for k in kept} for s in seeds} for arm in ARMS}
    return {"steps": steps, "curves": curves, "final": final, "steps_to_baseline_final": reach,
            "checks": checks, "runs": runs_meta}


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    """One block per setting: final values (mean ± std over seeds) per arm and the steps REPA needs to
    reach the baseline's final value (per seed, and on the seed-mean curves)."""
    ref = summary["reference_probes"]
    meta = summary["meta"]
    lines = [f"REPA convergence on the digits demo: {meta['steps']} steps, seeds {meta['seeds']}, "
             f"evaluated every {meta['eval_every']} steps",
             f"reference probes (held-out accuracy): noisy input x_t (t={meta['evals']['probe_t']}) "
             f"{ref['noisy_input']:.3f}, clean input {ref['clean_input']:.3f}, "
             f"teacher on clean {ref['teacher_clean']:.3f}"]
    for setting, res in summary["settings"].items():
        last = res["steps"][-1]
        lines += ["", f"[{setting}]",
                  f"{'metric':<16} {'baseline':>15} {'repa':>15} {'repa-base':>10}   "
                  "steps to baseline's final (per seed | mean curves)"]
        for metric in METRICS:
            f = res["final"][metric]
            base, rep = f["baseline"], f["repa"]
            cell = lambda s: "-" if s is None else f"{s['mean']:.3f} ± {s['std']:.3f}"
            diff = _fmt(rep["mean"] - base["mean"]) if base and rep else "-"
            reach = res["steps_to_baseline_final"][metric]
            how = "-" if reach is None else (
                " ".join("never" if v is None else str(v) for v in reach["per_seed"].values())
                + f" | {'never' if reach['mean_curves'] is None else reach['mean_curves']} (of {last}"
                + ("" if not reach.get("speedup_mean_curves") else f", {reach['speedup_mean_curves']:.1f}x") + ")")
            lines.append(f"{metric:<16} {cell(base):>15} {cell(rep):>15} {diff:>10}   {how}")
        checks = res["checks"]
        lines.append(f"same init in both arms: {checks['same_init']}; "
                     f"same first training loss: {checks['same_first_loss']}")
    cpu = meta.get("cpu_seconds")
    per_worker = "" if cpu is None else f"; the runs' CPU time {cpu:.0f} s ({cpu / meta['workers']:.0f} s per worker)"
    lines.append(f"\nwall time {meta['wall_seconds']:.0f} s on {meta['workers']} worker(s){per_worker}")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Curves, one line per seed (arms as colours), a panel per metric, a row per setting; the dotted
    line is the baseline's final value (mean over seeds), the probe panel's gray line the probe on the
    noisy input itself; the similarity panel also holds the held-out NULL-label similarity (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = list(summary["settings"])
    fig = Figure(figsize=(4.0 * len(PANELS), 3.3 * len(settings) + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(settings), len(PANELS), squeeze=False)
    for row, setting in enumerate(settings):
        res = summary["settings"][setting]
        for col, metric in enumerate(PANELS):
            _panel(axes[row, col], res, metric, summary["reference_probes"]["noisy_input"])
            axes[row, col].set_title(f"{setting}: {LABELS[metric]}", fontsize=9)
    fig.suptitle(f"REPA vs baseline on the digits demo DiT ({len(summary['meta']['seeds'])} seeds, one line each)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _panel(ax: Any, res: dict[str, Any], metric: str, noisy_input_probe: float) -> None:
    """One metric of one setting: a line per arm and seed, and the panel's reference lines."""
    colours = {"baseline": "tab:blue", "repa": "tab:orange"}
    shown = (metric, "similarity_null") if metric == "similarity" else (metric,)
    for key in shown:
        for arm in ARMS:
            for s, curve in enumerate(res["curves"][arm].values()):
                if curve.get(key) is not None:
                    label = (arm if key == metric else f"{arm}: {LABELS[key]}") if s == 0 else None
                    ax.plot(res["steps"], curve[key], color=colours[arm], lw=1.2, alpha=0.85, marker=".", ms=3,
                            ls="-" if key == metric else "--", label=label)
    base = res["final"][metric]["baseline"]
    if base is not None:
        ax.axhline(base["mean"], color=colours["baseline"], ls=":", lw=1, label="baseline final (mean)")
    if metric == "probe":
        ax.axhline(noisy_input_probe, color="0.5", ls="--", lw=1, label="probe on noisy input")
    if metric not in REPA_ONLY:
        _log_scale_if_wide(ax, [c[metric] for arm in ARMS for c in res["curves"][arm].values()])
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _log_scale_if_wide(ax: Any, curves: list[Optional[list[float]]]) -> None:
    """A log y-axis with plain tick labels (1, 2, 3, 5 of each decade) when the positive values span more
    than a factor of 5 (losses and distances fall by orders of magnitude)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    values = [v for curve in curves if curve is not None for v in curve if v is not None]
    if not values or min(values) <= 0 or max(values) <= 5 * min(values):
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--fd-samples", type=int, default=EvalOptions.fd_samples)
    parser.add_argument("--sample-steps", type=int, default=EvalOptions.sample_steps)
    parser.add_argument("--guidance", type=float, default=EvalOptions.guidance)
    parser.add_argument("--val-repeats", type=int, default=EvalOptions.val_repeats)
    parser.add_argument("--probe-t", type=float, default=EvalOptions.probe_t, help="flow time of the probe's input")
    parser.add_argument("--probe-train", type=int, default=EvalOptions.probe_train,
                        help="training digits the probe is fit on (0: all)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides of experiment=demo for both arms (repa.* only matter to REPA)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run exercising every code path (2 seeds, 4 steps, small evaluation sets)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="train nothing: print the table of (and --plot) a JSON this script wrote")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="write the PNG of the curves here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every = args.seeds[:2], 4, 2
        args.fd_samples, args.sample_steps, args.val_repeats, args.probe_train = 32, 2, 1, 100
    if args.steps < 1 or args.eval_every < 1 or len(args.seeds) < 1 or args.fd_samples < 3:
        parser.error("--steps and --eval-every must be >= 1, --fd-samples >= 3, and one seed at least")
    if not 0.0 <= args.probe_t <= 1.0:
        parser.error(f"--probe-t is a flow time in [0, 1], got {args.probe_t}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def _git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = bool(git("status", "--porcelain", "--", "lightning_repa"))  # the package differs from the commit
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": dirty}


def run_all(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    """Run the jobs, ``workers`` at a time (in this process when 1), printing one line per run."""
    results = []

    def report(result: dict[str, Any]) -> None:
        results.append(result)
        c = result["curves"]
        print(f"[{len(results)}/{len(jobs)}] {result['setting']:<13} {result['arm']:<8} seed {result['seed']}: "
              f"{result['seconds']:.0f} s (eval {result['eval_seconds']:.0f} s, CPU {result['cpu_seconds']:.0f} s); "
              f"final val_loss {c['val_loss'][-1]:.4f}, "
              f"probe {c['probe'][-1]:.3f}, fd {c['fd'][-1]:.2f}", flush=True)

    if workers <= 1:
        for job in jobs:
            report(run_job(job))
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(run_job, job) for job in jobs]):
            report(future.result())
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.from_json is not None:
        summary = json.loads(args.from_json.read_text())
        print(format_table(summary), flush=True)
        if args.plot is not None:
            print(f"wrote {plot(summary, args.plot)}")
        return summary
    evals = EvalOptions(probe_t=args.probe_t, probe_train=args.probe_train, val_repeats=args.val_repeats,
                        fd_samples=args.fd_samples, sample_steps=args.sample_steps, guidance=args.guidance)
    base = Job("conditional", "baseline", args.seeds[0], args.steps, args.eval_every, evals, tuple(args.override))
    jobs = [replace(base, setting=setting, arm=arm, seed=seed)
            for seed in args.seeds for setting in args.settings for arm in ARMS]
    print(f"{len(jobs)} runs of {args.steps} steps on {args.workers} worker(s); evaluations at {base.eval_steps}",
          flush=True)
    start = time.perf_counter()
    results = run_all(jobs, args.workers)
    reference = run_reference(base)
    wall = time.perf_counter() - start
    summary = {
        "meta": {"steps": args.steps, "eval_every": args.eval_every, "seeds": args.seeds, "settings": args.settings,
                 "workers": args.workers, "quick": args.quick, "overrides": args.override, "evals": asdict(evals),
                 "wall_seconds": wall, "cpu_seconds": sum(r["cpu_seconds"] for r in results),
                 "torch": torch.__version__, "python": platform.python_version(),
                 "machine": platform.machine(), "cpus": os.cpu_count(), "git": _git_state(),
                 "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                 "block_index": results[0]["block_index"],
                 "parameters": {arm: next(r["parameters"] for r in results if r["arm"] == arm) for arm in ARMS},
                 "higher_is_better": HIGHER_IS_BETTER},
        "reference_probes": reference,
        "settings": {s: summarize_setting([r for r in results if r["setting"] == s], args.seeds)
                     for s in args.settings},
    }
    print(format_table(summary), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(summary), indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        print(f"wrote {plot(summary, args.plot)}")
    return summary


if __name__ == "__main__":
    main()
