"""What the benchmarks share: the statistics (honest speedups, bootstrap intervals), the timing ring
that makes fits take turns, process isolation (threads, RNG, warnings), peak memory, JSON and the
machine's description, and the helpers that format numbers with their intervals.

Nothing here trains or times a model; ``convergence.py``, ``search.py`` and ``overhead.py`` do.

The speedup of one seed and metric (issue 22, item 2), on evaluation steps ``s_1 < ... < s_n``:

- ``F`` = the mean of the baseline's last 3 evaluations;
- ``b`` = the first evaluation step at which the baseline reaches ``F`` (``>=`` when higher is
  better, as the probe; ``<=`` for losses and distances);
- ``a`` = the first evaluation step at which the aligned arm reaches ``F``;
- ``speedup = b / a``, or None when the aligned arm never reaches ``F``.

Over seeds: the per-seed values, their mean over the seeds that reached ``F`` (``reached`` says
how many did) and a 95 % percentile bootstrap interval of that mean (10,000 resamples of the seeds,
with replacement, numpy generator seeded 0). The paired final difference is per seed the aligned
arm's final minus the baseline's (each final the mean of its last 3 evaluations), with the same mean
and interval over all seeds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import resource
import subprocess
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAST = 3  # evaluations averaged into a final value
BOOTSTRAP = {"resamples": 10_000, "seed": 0, "level": 0.95, "kind": "percentile"}

# --------------------------------------------------------------------------- statistics


def final_value(curve: Sequence[float], last: int = LAST) -> float:
    """The mean of the last ``last`` values of a curve."""
    if len(curve) < last:
        raise ValueError(f"a final value needs {last} evaluations, the curve has {len(curve)}")
    return float(np.mean(curve[-last:]))


def first_reach(steps: Sequence[int], curve: Sequence[float], target: float, higher: bool) -> Optional[int]:
    """The first step whose value reaches ``target`` (>= when higher is better, else <=); None if none does."""
    for step, value in zip(steps, curve):
        if (value >= target) if higher else (value <= target):
            return int(step)
    return None


def speedup(steps: Sequence[int], baseline: Sequence[float], aligned: Sequence[float], higher: bool,
            last: int = LAST) -> dict[str, Any]:
    """``F``, ``b``, ``a`` and ``b / a`` of one seed (see the module docstring)."""
    target = final_value(baseline, last)
    b = first_reach(steps, baseline, target, higher)
    a = first_reach(steps, aligned, target, higher)
    if b is None:  # the mean of the last values is reached by one of them: cannot happen
        raise RuntimeError(f"the baseline never reaches its own final value {target}: {baseline}")
    return {"final": target, "baseline_step": b, "aligned_step": a,
            "speedup": None if a is None or a == 0 else b / a}


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], np.ndarray] = np.mean,
                 resamples: int = BOOTSTRAP["resamples"], seed: int = BOOTSTRAP["seed"],
                 level: float = BOOTSTRAP["level"]) -> Optional[list[float]]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (resampled with replacement);
    ``statistic`` maps (R, n) to (R,) along axis 1. None for no values; [v, v] for one."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    picks = x[rng.integers(0, x.size, size=(resamples, x.size))]  # (R, n)
    stats = statistic(picks, axis=1)
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))]


def cluster_bootstrap_ci(clusters: Sequence[Sequence[float]], statistic: Callable[[np.ndarray], float] = np.median,
                         resamples: int = 2_000, seed: int = BOOTSTRAP["seed"],
                         level: float = BOOTSTRAP["level"]) -> list[float]:
    """Two-level percentile bootstrap: resample the clusters (e.g. rounds), then the values inside each
    picked cluster, and take ``statistic`` of the pooled values; the interval of that statistic."""
    groups = [np.asarray(c, dtype=float) for c in clusters if len(c)]
    if not groups:
        raise ValueError("cluster_bootstrap_ci needs at least one non-empty cluster")
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for r in range(resamples):
        picked = [groups[i] for i in rng.integers(0, len(groups), size=len(groups))]
        stats[r] = statistic(np.concatenate([g[rng.integers(0, g.size, size=g.size)] for g in picked]))
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))]


def summarize_metric(steps: Sequence[int], baseline: Mapping[str, Sequence[float]],
                     aligned: Mapping[str, Sequence[float]], higher: bool, last: int = LAST) -> dict[str, Any]:
    """Speedups and paired final differences over seeds (``baseline`` and ``aligned``: seed -> curve)."""
    seeds = list(baseline)
    per = {s: speedup(steps, baseline[s], aligned[s], higher, last) for s in seeds}
    reached = [per[s]["speedup"] for s in seeds if per[s]["speedup"] is not None]
    diffs = {s: final_value(aligned[s], last) - final_value(baseline[s], last) for s in seeds}
    return {
        "speedup": {"per_seed": {s: per[s]["speedup"] for s in seeds},
                    "mean": float(np.mean(reached)) if reached else None,
                    "ci95": bootstrap_ci(reached), "reached": len(reached), "seeds": len(seeds),
                    "baseline_final": {s: per[s]["final"] for s in seeds},
                    "baseline_step": {s: per[s]["baseline_step"] for s in seeds},
                    "aligned_step": {s: per[s]["aligned_step"] for s in seeds}},
        "paired_final_diff": {"per_seed": diffs, "mean": float(np.mean(list(diffs.values()))),
                              "ci95": bootstrap_ci(list(diffs.values()))},
        "final": {arm: {"per_seed": {s: final_value(c[s], last) for s in seeds},
                        "mean": float(np.mean([final_value(c[s], last) for s in seeds])),
                        "ci95": bootstrap_ci([final_value(c[s], last) for s in seeds])}
                  for arm, c in (("baseline", baseline), ("aligned", aligned))},
    }


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean and bootstrap interval of plain values (e.g. a final probe per seed)."""
    return {"mean": float(np.mean(values)), "ci95": bootstrap_ci(values)}


# --------------------------------------------------------------------------- formatting


def fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_ci(mean: Optional[float], ci: Optional[Sequence[float]], digits: int = 3) -> str:
    """``0.812 [0.801, 0.824]``; ``-`` for no value."""
    if mean is None:
        return "-"
    return fmt(mean, digits) + ("" if ci is None else f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# --------------------------------------------------------------------------- the timing ring


class Baton:
    """Threads that take turns in a fixed ring: only the holder runs, the others wait (without the
    GIL), so the modes' steps interleave one by one and never overlap."""

    def __init__(self, names: list[str]) -> None:
        self._ring, self._holder = list(names), names[0]
        self._cv = threading.Condition()

    def wait(self, name: str) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._holder == name)

    def turn(self, name: str) -> None:
        """Hand the baton to the next in the ring and wait until it comes back."""
        with self._cv:
            self._holder = self._after(name)
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._holder == name)

    def leave(self, name: str) -> None:
        with self._cv:
            following = self._after(name)
            self._ring.remove(name)
            if self._holder == name:
                self._holder = following if self._ring else None
            self._cv.notify_all()

    def _after(self, name: str) -> str:
        return self._ring[(self._ring.index(name) + 1) % len(self._ring)]


def take_turns(work: dict[str, Callable[[Callable[[], None]], Any]]) -> dict[str, Any]:
    """Run each ``work[name](turn)`` in its own thread, in turns (in the dict's order), and return their
    results; ``turn()`` is where one hands over. The first error is raised once all have finished."""
    baton = Baton(list(work))
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def participant(name: str) -> None:
        baton.wait(name)
        try:
            results[name] = work[name](lambda: baton.turn(name))
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the main thread
            errors.append(error)
        finally:
            baton.leave(name)

    threads = [threading.Thread(target=participant, args=(name,), name=f"bench-{name}", daemon=True) for name in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------- isolation and memory

LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_repa")
QUIET = (r".*does not have many workers.*", r".*is smaller than the logging interval.*", r".*LeafSpec.*",
         r".*`training_step` returns.*", r".*lbfgs failed to converge.*", r".*has `shuffle=True`.*",
         r"Accessing config attribute `latents_.*")


def quiet() -> None:
    """Lightning's banners and its notes about in-memory data and short runs: not about the benchmark."""
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")


@contextmanager
def isolated(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch and BLAS/OpenMP threads (sklearn's lbfgs with two BLAS threads on two
    busy cores is 100x slower than with one), quiet, and leave the caller's thread counts, RNG states,
    environment, warning filters and log levels as they were (jobs also run in the caller's process)."""
    import lightning  # noqa: F401  (its import sets its loggers' levels: before ours)
    import torch
    from threadpoolctl import threadpool_limits

    torch_threads, env = torch.get_num_threads(), dict(os.environ)
    rng = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    loggers = {name: logging.getLogger(name).level for name in LOGGERS}
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads), warnings.catch_warnings():
            quiet()
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


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB: Linux's VmHWM (``ru_maxrss`` would keep the peak of
    the parent it was forked from, across exec), else ``ru_maxrss`` (KiB; bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# --------------------------------------------------------------------------- JSON and the machine


def jsonable(value: Any) -> Any:
    """Non-finite floats become null; numpy scalars, tuples and keys become JSON's own."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return jsonable(value.item())
    return value


def write_json(path: Path, document: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(document), indent=1) + "\n")
    return path


def git_state() -> dict[str, Any]:
    """The checkout's commit, and whether its package differs from it (``machine()`` says whether the package
    that ran is the checkout's)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = bool(git("status", "--porcelain", "--", "lightning_repa"))
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": dirty}


def machine() -> dict[str, Any]:
    """Versions and the machine, for a JSON's ``meta``."""
    import lightning
    import torch

    import lightning_repa

    package = Path(lightning_repa.__file__).resolve().parent
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "package": str(package), "package_in_checkout": package.is_relative_to(REPO), "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "git": git_state()}
