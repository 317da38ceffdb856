"""benchmarks/convergence.py and its statistics (benchmarks/common.py): the speedup and interval functions
against hand-computed examples, and the `--quick` run of each method end to end, its JSON checked
against its own curves with an implementation written here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "convergence.py"
METRICS = ("val_loss", "probe", "fd", "fd_train")
HIGHER = {"val_loss": False, "probe": True, "fd": False, "fd_train": False}
SETTINGS = {"repa": ["repa_unconditional", "repa_conditional"], "urepa": ["urepa_unconditional"],
            "crepa": ["crepa_unconditional"]}


@pytest.fixture(scope="module")
def common() -> Any:
    sys.path.insert(0, str(BENCH))  # the benchmarks' own modules (they import each other by name)
    import common as module

    return module


# --------------------------------------------------------------------------- statistics, by hand


def test_final_value_and_first_reach(common):
    assert common.final_value([1.0, 2.0, 3.0, 4.0, 5.0]) == 4.0  # (3 + 4 + 5) / 3
    with pytest.raises(ValueError, match="needs 3 evaluations"):
        common.final_value([1.0, 2.0])
    assert common.first_reach([10, 20, 30], [0.1, 0.5, 0.9], 0.5, higher=True) == 20
    assert common.first_reach([10, 20, 30], [0.9, 0.5, 0.1], 0.4, higher=False) == 30
    assert common.first_reach([10, 20, 30], [0.1, 0.2, 0.3], 0.5, higher=True) is None


def test_speedup_is_b_over_a(common):
    steps = [50, 100, 150, 200, 250]
    # probe: F = (0.7 + 0.8 + 0.75) / 3 = 0.75, first reached by the baseline at 200, by the aligned arm at 100
    r = common.speedup(steps, [0.5, 0.6, 0.7, 0.8, 0.75], [0.6, 0.76, 0.8, 0.82, 0.83], higher=True)
    assert r == {"final": pytest.approx(0.75), "baseline_step": 200, "aligned_step": 100, "speedup": 2.0}
    # a loss: F = (3 + 2 + 2.5) / 3 = 2.5, the baseline is <= 2.5 first at 200, the aligned arm at 150
    r = common.speedup(steps, [5.0, 4.0, 3.0, 2.0, 2.5], [4.0, 3.0, 2.5, 2.4, 2.3], higher=False)
    assert (r["baseline_step"], r["aligned_step"]) == (200, 150) and r["speedup"] == pytest.approx(200 / 150)
    r = common.speedup(steps, [5.0, 4.0, 3.0, 2.0, 2.5], [9.0] * 5, higher=False)
    assert r["aligned_step"] is None and r["speedup"] is None  # never reaches: null, not 0


def test_bootstrap_interval_of_small_samples(common):
    # two values 0 and 1: the resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 % and
    # 97.5 % quantiles are 0 and 1
    assert common.bootstrap_ci([0.0, 1.0]) == [0.0, 1.0]
    assert common.bootstrap_ci([2.0, 2.0, 2.0]) == [2.0, 2.0]
    assert common.bootstrap_ci([3.0]) == [3.0, 3.0]
    assert common.bootstrap_ci([]) is None and common.bootstrap_ci([None, None]) is None
    lo, hi = common.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert 1.0 < lo < 3.0 < hi < 5.0  # means of 5 resampled values: the interval is inside the range
    # clusters [1, 1, 1] and [3, 3, 3] with the median: both picks of one cluster give 1 or 3, one of each
    # gives the pooled median 2; the quantiles are 1 and 3
    assert common.cluster_bootstrap_ci([[1.0] * 3, [3.0] * 3]) == [1.0, 3.0]
    assert common.cluster_bootstrap_ci([[1.5] * 4]) == [1.5, 1.5]


def test_summarize_metric_over_seeds(common):
    steps = [50, 100, 150, 200, 250]
    base = {"0": [0.5, 0.6, 0.7, 0.8, 0.75], "1": [0.5, 0.6, 0.7, 0.8, 0.75]}
    aligned = {"0": [0.6, 0.76, 0.8, 0.82, 0.83], "1": [0.1, 0.2, 0.3, 0.4, 0.5]}
    s = common.summarize_metric(steps, base, aligned, higher=True)
    assert s["speedup"]["per_seed"] == {"0": 2.0, "1": None}
    assert s["speedup"]["mean"] == 2.0 and s["speedup"]["reached"] == 1 and s["speedup"]["seeds"] == 2
    assert s["speedup"]["ci95"] == [2.0, 2.0]
    # finals: aligned (0.82 + 0.83 + 0.8) / 3 = 0.8167 and 0.4, baseline 0.75 both
    diffs = s["paired_final_diff"]["per_seed"]
    assert diffs["0"] == pytest.approx(0.8166667 - 0.75, abs=1e-6) and diffs["1"] == pytest.approx(0.4 - 0.75)
    assert s["paired_final_diff"]["mean"] == pytest.approx((diffs["0"] + diffs["1"]) / 2)
    assert s["paired_final_diff"]["ci95"] == pytest.approx([diffs["1"], diffs["0"]])  # two values: their extremes


def test_frechet_distance_of_shifted_gaussians(common):
    np = pytest.importorskip("numpy")
    from convergence_eval import frechet_distance, gaussian_stats

    a = np.random.default_rng(0).normal(size=(500, 4))
    stats = gaussian_stats(a)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-6)
    shifted = gaussian_stats(a + np.array([3.0, 0.0, 0.0, 4.0]))
    assert frechet_distance(stats, shifted) == pytest.approx(25.0, abs=1e-6)  # |shift|^2, same covariance


# --------------------------------------------------------------------------- the quick runs


def _first(steps: list[int], curve: list[float], target: float, higher: bool) -> Optional[int]:
    hits = [s for s, v in zip(steps, curve) if (v >= target if higher else v <= target)]
    return hits[0] if hits else None


def _expected_speedup(steps: list[int], base: list[float], aligned: list[float], higher: bool) -> Optional[float]:
    target = sum(base[-3:]) / 3
    b, a = _first(steps, base, target, higher), _first(steps, aligned, target, higher)
    return None if a is None else b / a


def test_runs_dir_keeps_finished_runs_and_reuses_only_matching_ones(common, tmp_path):
    """--runs-dir: a finished run is reused when its setting, evaluation and overrides match; a seed is
    reported (--finished-only) only once both of its arms finished."""
    import convergence

    args = convergence.parse_args(["--method", "repa", "--settings", "unconditional", "--quick", "--seeds", "0", "1",
                                   "--runs-dir", str(tmp_path), "--finished-only"])
    (setting,) = convergence.make_settings(args)
    evals = convergence.evals_for("repa", args)
    jobs = [convergence.Job(setting, arm, seed, evals, tuple(args.override)) for seed in (0, 1)
            for arm in ("baseline", "aligned")]

    def record(job, key):
        return {"setting": job.setting.name, "arm": job.arm, "seed": job.seed, "job_key": key}

    for job in jobs[:3]:  # seed 0 both arms, seed 1 the baseline only
        convergence.run_path(tmp_path, job).write_text(json.dumps(record(job, convergence.job_key(job))))
    other = convergence.Job(setting, "aligned", 1, evals, ("repa.lam=2",))  # another command's run, same file name
    convergence.run_path(tmp_path, other).write_text(json.dumps(record(other, convergence.job_key(other))))
    done, todo = convergence.load_finished(jobs, tmp_path)
    assert [(r["arm"], r["seed"]) for r in done] == [("baseline", 0), ("aligned", 0), ("baseline", 1)]
    assert todo == [jobs[3]]
    assert convergence.paired_seeds([setting], done, [0, 1]) == {setting.name: [0]}
    assert convergence.load_finished(jobs, None) == ([], jobs)
    with pytest.raises(SystemExit):
        convergence.parse_args(["--finished-only"])  # it reports --runs-dir: the directory must be given


@pytest.fixture(scope="module", params=list(SETTINGS))
def quick(request, tmp_path_factory) -> dict[str, Any]:
    """`--quick --method M` in a subprocess, from a directory outside the repository."""
    method = request.param
    out = tmp_path_factory.mktemp(f"convergence_{method}")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--method", method, "--json", str(out / "c.json"),
                           "--plot", str(out / "c.png")], cwd=out, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"method": method, "doc": json.loads((out / "c.json").read_text()), "png": out / "c.png",
            "files": sorted(p.name for p in out.iterdir()), "seconds": time.perf_counter() - start,
            "stdout": proc.stdout}


@pytest.mark.slow
def test_quick_run_writes_the_schema(quick):
    doc, method = quick["doc"], quick["method"]
    assert quick["files"] == ["c.json", "c.png"]  # nothing else written where it ran
    assert list(doc["settings"]) == SETTINGS[method]
    assert doc["meta"]["quick"] and doc["meta"]["seeds"] == [0, 1]
    assert set(doc["meta"]["methods"]) == {method}
    cost = doc["meta"]["methods"][method]
    assert cost["cpu_seconds"] > 0 and cost["wall_span_seconds"] > 0 and cost["runs"] == 4 * len(SETTINGS[method])
    assert doc["reference_probes"][method]["teacher_clean"] > 0.9  # the shipped teacher is really pretrained
    for name, res in doc["settings"].items():
        assert res["method"] == method and res["steps"] == [2, 4, 6]
        for arm in ("baseline", "aligned"):
            assert sorted(res["curves"][arm]) == ["0", "1"]
            for curves in res["curves"][arm].values():
                for metric in ("probe", "fd", "val_loss"):
                    values = curves[metric]
                    assert len(values) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in values)
                assert all(0.0 <= v <= 1.0 for v in curves["probe"]) and min(curves["fd"]) >= -1e-6
                assert (curves["similarity"] is None) == (arm == "baseline")
        for metric in METRICS:
            s = res["summary"][metric]
            assert set(s["speedup"]) >= {"per_seed", "mean", "ci95"} and set(s["paired_final_diff"]) >= {"mean", "ci95"}
        assert set(res["probe_t_sweep"]["t"]) == {"0.25", "0.5", "0.75"}
    assert all(f"[{name}]" in quick["stdout"] for name in SETTINGS[method])  # the printed table


@pytest.mark.slow
def test_quick_run_pairs_its_arms(quick):
    for res in quick["doc"]["settings"].values():
        assert res["checks"] == {"same_init": True, "same_first_loss": True}
        runs = res["runs"]
        for seed in ("0", "1"):
            assert runs["baseline"][seed]["init_fingerprint"] == runs["aligned"][seed]["init_fingerprint"]
            assert runs["baseline"][seed]["final_fingerprint"] != runs["aligned"][seed]["final_fingerprint"]  # it acted
        assert runs["baseline"]["0"]["init_fingerprint"] != runs["baseline"]["1"]["init_fingerprint"]


@pytest.mark.slow
def test_quick_run_summary_follows_from_its_curves(quick):
    for res in quick["doc"]["settings"].values():
        steps, curves = res["steps"], res["curves"]
        for metric in METRICS:
            s = res["summary"][metric]
            for seed in ("0", "1"):
                base, al = curves["baseline"][seed][metric], curves["aligned"][seed][metric]
                expected = _expected_speedup(steps, base, al, HIGHER[metric])
                assert s["speedup"]["per_seed"][seed] == pytest.approx(expected)
                assert s["paired_final_diff"]["per_seed"][seed] == pytest.approx(sum(al[-3:]) / 3 - sum(base[-3:]) / 3)
            reached = [v for v in s["speedup"]["per_seed"].values() if v is not None]
            assert s["speedup"]["reached"] == len(reached)
            assert s["speedup"]["mean"] == (pytest.approx(sum(reached) / len(reached)) if reached else None)
            if reached:
                lo, hi = s["speedup"]["ci95"]
                assert min(reached) - 1e-12 <= lo <= hi <= max(reached) + 1e-12
            diffs = list(s["paired_final_diff"]["per_seed"].values())
            assert s["paired_final_diff"]["mean"] == pytest.approx(sum(diffs) / len(diffs))


@pytest.mark.slow
def test_quick_run_plot_is_a_png(quick):
    from PIL import Image

    with Image.open(quick["png"]) as image:
        image.verify()
    with Image.open(quick["png"]) as image:
        width, height = image.size
    assert width >= 1000 and height >= 300 * len(SETTINGS[quick["method"]])  # a row of 3 panels per setting


@pytest.mark.slow
def test_evaluating_does_not_change_the_training_trajectory(common):
    """Evaluations every 2 steps and every 4 train the same weights: evaluation draws from its own
    generators, never from the global RNG that draws the training noise."""
    from dataclasses import replace

    from convergence_eval import EvalOptions
    from convergence_methods import METHODS
    from convergence_train import Job, run_job

    evals = EvalOptions(probe_train=40, val_repeats=1, fd_samples=8, sample_steps=1, sweep_ts=(0.5,), batch_size=64)
    setting = replace(METHODS["repa"].setting(conditional=False), steps=12, eval_every=2, overrides=())
    often = run_job(Job(setting, "aligned", 3, evals))
    rarely = run_job(Job(replace(setting, eval_every=4), "aligned", 3, evals))
    assert often["steps"] == [2, 4, 6, 8, 10, 12] and rarely["steps"] == [4, 8, 12]
    assert often["final_fingerprint"] == rarely["final_fingerprint"]
    assert often["final_train_loss"] == rarely["final_train_loss"]
    for metric in ("val_loss", "probe", "fd"):
        assert often["curves"][metric][-1] == rarely["curves"][metric][-1], metric
