"""What the convergence benchmark measures at each evaluation, with fixed noise shared by both arms.

``val_loss``
    the rectified-flow loss on the 180 held-out samples, ``|| v(x_t, t) - (eps - x0) ||^2``, with
    fixed times (logit-normal, as training draws them) and noise: ``--val-repeats`` draws from a
    generator seeded ``probe_seed + 7``, the same for every arm, seed and evaluation.
``probe``
    linear-probe accuracy of the aligned block's token-averaged output at ``t = 0.5`` with the NULL
    label and fixed noise: a multinomial logistic regression (standardised features, L2, C = 1, lbfgs;
    deterministic) fit on ``--probe-train`` training samples (800 of the 1,617, evenly spread; clips
    600) and scored on the 180 held-out ones. For clips the tokens of all frames are averaged: the probe
    names the clip's digit. ``probe_t`` (final evaluation only): the same at t = 0.25, 0.5, 0.75.
``fd`` / ``fd_train``
    Frechet distance in the shipped teacher's feature space (its pre-logits: the average of its final
    normed patch tokens, 64-d), on frames, between ``--fd-samples`` generated samples (clips: all their
    frames) and the held-out (``fd``) or training (``fd_train``) samples' frames. The samples come
    from a ``--sample-steps`` Euler solve from one fixed noise tensor, the same for both arms, every
    seed and evaluation; conditional runs draw the classes ``i % 10``, unconditional ones the NULL label.
    The teacher runs at the frames' own size (16x24 frames: its position embedding interpolated to 8x12).

Reference probes (once per method): the same probe on the noisy input itself at each t (flattened),
on the clean input, and on the teacher's pre-logits of the clean input (frames averaged).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from convergence_methods import MethodSpec, as_frames, dataset_tensors, null_labels, per_sample, pool


@dataclass(frozen=True)
class EvalOptions:
    """How each evaluation is made (the same for every run of a benchmark)."""

    probe_t: float = 0.5  # flow time of the probe's noisy input (0: clean, 1: noise)
    sweep_ts: tuple[float, ...] = (0.25, 0.5, 0.75)  # the final evaluation's probe-t sweep
    probe_seed: int = 0  # seeds the probe's and the held-out loss's fixed noise
    probe_train: int = 800  # training samples the probe is fit on (0: all 1,617), evenly spread
    val_repeats: int = 1  # fixed noise draws of the held-out loss
    fd_samples: int = 1000  # generated samples per evaluation (clips: each gives its frames)
    sample_steps: int = 4  # Euler steps of the sampler
    guidance: float = 1.0  # classifier-free guidance of conditional sampling (1: none)
    sample_seed: int = 0  # seeds the sampler's fixed noise
    batch_size: int = 200  # evaluation batch size


@dataclass
class EvalData:
    """Everything an evaluation reads that does not depend on the run. Samples in [0, 1]."""

    val_x: Tensor  # (180, 1, *shape)
    val_y: Tensor  # (180,)
    train_x: Tensor  # (Ntr, 1, *shape): the probe's training samples
    train_y: Tensor
    probe_noise_val: Tensor  # like val_x
    probe_noise_train: Tensor  # like train_x
    loss_t: Tensor  # (R, 180) flow times of the held-out loss
    loss_noise: Tensor  # (R, 180, 1, *shape)
    sample_noise: Tensor  # (fd_samples, 1, *shape)
    reference_stats: dict[str, tuple[np.ndarray, np.ndarray]]  # "fd" / "fd_train" -> (mu (D,), sigma (D, D))
    teacher: torch.nn.Module = field(repr=False)


def load_teacher() -> torch.nn.Module:
    """The shipped digits ViT with its weights, any input size (timm's ``dynamic_img_size``)."""
    import timm
    from safetensors.torch import load_file

    from lightning_repa.demo import TEACHER_NAME, teacher_checkpoint_path

    model = timm.create_model(TEACHER_NAME, pretrained=False, num_classes=10, dynamic_img_size=True)
    model.load_state_dict(load_file(str(teacher_checkpoint_path())), strict=True)
    return model.eval().requires_grad_(False)


def teacher_features(teacher: torch.nn.Module, frames: Tensor, batch_size: int = 512) -> Tensor:
    """The teacher's pre-logits (mean of its final normed patch tokens) of frames (N, 1, H, W) in [0, 1]:
    (N, D) float64."""
    from lightning_repa.demo import normalize_for_teacher

    out = []
    with torch.no_grad():
        for chunk in frames.split(batch_size):
            tokens = teacher.forward_features(normalize_for_teacher(chunk))  # (B, 1 + M, D)
            out.append(teacher.forward_head(tokens, pre_logits=True).double())  # (B, D)
    return torch.cat(out)


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


def frame_stats(teacher: torch.nn.Module, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian statistics of the teacher's features of the frames of samples x."""
    return gaussian_stats(teacher_features(teacher, as_frames(x)).numpy())


_EVAL_DATA: dict[tuple, EvalData] = {}  # per process: the runs of a worker share it


def build_eval_data(spec: MethodSpec, datamodule: Any, options: EvalOptions) -> EvalData:
    """Held-out and training samples of the demo's split, the fixed noises and the reference statistics
    (built once per process and method: they depend on neither arm nor seed). Draws only from its own
    generators."""
    key = (spec.name, options, datamodule.val_fraction, datamodule.split_seed)
    if key not in _EVAL_DATA:
        datamodule.setup("fit")
        val_x, val_y = dataset_tensors(datamodule.val_set)
        all_x, all_y = dataset_tensors(datamodule.train_set)
        n = len(all_y) if options.probe_train <= 0 else min(options.probe_train, len(all_y))
        pick = torch.linspace(0, len(all_y) - 1, n).round().long()  # evenly spread, deterministic
        gen = torch.Generator().manual_seed(options.probe_seed)
        probe_val = torch.randn(val_x.shape, generator=gen)
        probe_train = torch.randn((n, *val_x.shape[1:]), generator=gen)
        lgen = torch.Generator().manual_seed(options.probe_seed + 7)
        loss_t = torch.sigmoid(torch.randn((options.val_repeats, len(val_y)), generator=lgen))  # logit-normal
        loss_noise = torch.randn((options.val_repeats, *val_x.shape), generator=lgen)
        sample_noise = torch.randn((options.fd_samples, *val_x.shape[1:]),
                                   generator=torch.Generator().manual_seed(options.sample_seed))
        teacher = load_teacher()
        stats = {"fd": frame_stats(teacher, val_x), "fd_train": frame_stats(teacher, all_x)}
        _EVAL_DATA[key] = EvalData(val_x, val_y, all_x[pick], all_y[pick], probe_val, probe_train, loss_t,
                                   loss_noise, sample_noise, stats, teacher)
    return _EVAL_DATA[key]


def noisy(x: Tensor, noise: Tensor, t: float) -> Tensor:
    """``x_t = (1 - t) x0 + t eps`` of samples x in [0, 1] (x0 = 2x - 1)."""
    return (1.0 - t) * (x * 2.0 - 1.0) + t * noise


def validation_loss(model: Any, data: EvalData, conditional: bool, batch_size: int) -> float:
    """The flow-matching loss over the held-out samples with the fixed times and noise (mean over repeats)."""
    labels = data.val_y if conditional else null_labels(len(data.val_y))
    total, count = 0.0, 0
    for t_all, eps_all in zip(data.loss_t, data.loss_noise):
        for start in range(0, len(labels), batch_size):
            sl = slice(start, start + batch_size)
            x0, eps, t = data.val_x[sl] * 2.0 - 1.0, eps_all[sl], t_all[sl]  # (B, 1, ...), (B,)
            tb = t.view(-1, *[1] * (x0.dim() - 1))
            pred = model((1.0 - tb) * x0 + tb * eps, t, labels[sl])
            total += float(((pred - (eps - x0)) ** 2).mean()) * len(x0)
            count += len(x0)
    return total / count


class _StopForward(Exception):
    """Raised by a hook once the probed block has run: nothing after it is needed."""


def block_features(model: Any, block: torch.nn.Module, x: Tensor, noise: Tensor, t: float,
                   batch_size: int) -> np.ndarray:
    """The block's token-averaged output (N, D) on ``x_t`` with the NULL label; the forward stops there."""
    out: list[Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        out.append(pool(output))
        raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        for xb, eb in zip(x.split(batch_size), noise.split(batch_size)):
            try:
                model(noisy(xb, eb, t), torch.full((len(xb),), t), null_labels(len(xb)))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(out).numpy()


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised features, L2, C = 1, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs's ConvergenceWarning on an untrained model's features
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        clf.fit(train_x, train_y)
        return float(clf.score(test_x, test_y))


def block_probe(model: Any, block: torch.nn.Module, data: EvalData, t: float, batch_size: int) -> float:
    """The probe of the block at flow time t."""
    ftr = block_features(model, block, data.train_x, data.probe_noise_train, t, batch_size)
    fva = block_features(model, block, data.val_x, data.probe_noise_val, t, batch_size)
    return probe_accuracy(ftr, data.train_y.numpy(), fva, data.val_y.numpy())


def euler_sample(model: Any, noise: Tensor, labels: Tensor, steps: int, guidance: float, batch_size: int) -> Tensor:
    """The demo's sampler (Euler from t = 1 to 0, classifier-free guidance) from given noise; guidance 1
    makes one pass per step. Returns samples like noise, in [0, 1]."""
    from lightning_repa.demo.module import NULL_CLASS

    ts = torch.linspace(1.0, 0.0, steps + 1)
    out = []
    for x, y in zip(noise.split(batch_size), labels.split(batch_size)):
        for i in range(steps):
            t = ts[i].expand(len(x))
            if guidance == 1.0:
                v = model(x, t, y)
            else:
                v_cond, v_uncond = model(torch.cat([x, x]), t.repeat(2),
                                         torch.cat([y, torch.full_like(y, NULL_CLASS)])).chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            x = x + (ts[i + 1] - ts[i]) * v  # dt < 0: towards the data
        out.append(((x + 1.0) / 2.0).clamp(0.0, 1.0))
    return torch.cat(out)


def evaluate(model: Any, spec: MethodSpec, block_index: int, data: EvalData, options: EvalOptions,
             conditional: bool, sweep: bool = False) -> dict[str, Any]:
    """val_loss, probe, fd, fd_train (and with ``sweep`` the probe at each of ``sweep_ts``) of the module
    as it is now (eval mode, no_grad; the mode is restored)."""
    was_training = model.training
    model.eval()
    block = spec.block(model, block_index)
    try:
        with torch.no_grad():
            bs = options.batch_size
            out: dict[str, Any] = {"val_loss": validation_loss(model, data, conditional, bs),
                                   "probe": block_probe(model, block, data, options.probe_t, bs)}
            if sweep:
                out["probe_t"] = {str(t): out["probe"] if t == options.probe_t
                                  else block_probe(model, block, data, t, bs) for t in options.sweep_ts}
            n = len(data.sample_noise)
            labels = torch.arange(n) % 10 if conditional else null_labels(n)
            samples = euler_sample(model, data.sample_noise, labels, options.sample_steps, options.guidance, bs)
            generated = frame_stats(data.teacher, samples)
            for key, reference in data.reference_stats.items():
                out[key] = frechet_distance(generated, reference)
    finally:
        model.train(was_training)
    return out


def reference_probes(data: EvalData, ts: Sequence[float]) -> dict[str, Any]:
    """The probe on the inputs themselves: the noisy x_t flattened (at each t), the clean input
    flattened, and the teacher's pre-logits of the clean input (frames averaged)."""
    ytr, yva = data.train_y.numpy(), data.val_y.numpy()

    def flat(x: Tensor) -> np.ndarray:
        return x.flatten(1).double().numpy()

    def taught(x: Tensor) -> np.ndarray:
        return per_sample(teacher_features(data.teacher, as_frames(x)), len(x)).numpy()

    return {
        "noisy_input": {str(t): probe_accuracy(flat(noisy(data.train_x, data.probe_noise_train, t)), ytr,
                                               flat(noisy(data.val_x, data.probe_noise_val, t)), yva) for t in ts},
        "clean_input": probe_accuracy(flat(data.train_x), ytr, flat(data.val_x), yva),
        "teacher_clean": probe_accuracy(taught(data.train_x), ytr, taught(data.val_x), yva),
        "frames_per_sample": data.val_x.shape[2] if data.val_x.dim() == 5 else 1,
    }

