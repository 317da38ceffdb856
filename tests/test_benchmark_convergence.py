"""benchmarks/convergence.py (REPA vs no REPA on the digits demo): the quick run goes end to end,
its JSON says what its own curves say, and evaluating does not change what is trained."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "convergence.py"
ARMS = ("baseline", "repa")
SETTINGS = ("conditional", "unconditional")
METRICS = ("val_loss", "probe", "fd", "fd_train", "similarity", "similarity_null")
REPA_ONLY = ("similarity", "similarity_null")
COMPARED = ("val_loss", "probe", "fd", "fd_train")
HIGHER_IS_BETTER = {"val_loss": False, "probe": True, "fd": False, "fd_train": False}


def _benchmark() -> ModuleType:
    """The script as a module (it is not part of the package)."""
    name = "convergence_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict[str, Any]:
    """`--quick` run in a subprocess, from a directory outside the repository."""
    out = tmp_path_factory.mktemp("convergence")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out / "c.json"), "--plot", str(out / "c.png")],
        cwd=out, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"summary": json.loads((out / "c.json").read_text()), "png": out / "c.png", "stdout": proc.stdout,
            "files": sorted(p.name for p in out.iterdir())}


def _first_reaching(steps: list[int], curve: list[float], target: float, higher: bool) -> Optional[int]:
    hits = [s for s, v in zip(steps, curve) if (v >= target if higher else v <= target)]
    return hits[0] if hits else None


def _finite(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_quick_run_writes_what_was_asked(quick):
    summary = quick["summary"]
    meta = summary["meta"]
    assert quick["files"] == ["c.json", "c.png"]  # nothing else written where it ran
    assert meta["quick"] and meta["steps"] == 4 and meta["eval_every"] == 2 and len(meta["seeds"]) == 2
    assert list(summary["settings"]) == list(SETTINGS)
    assert meta["block_index"] == 2  # experiment=demo's block
    assert meta["parameters"]["repa"] > meta["parameters"]["baseline"]  # the projector, in the REPA arm only
    for name, accuracy in summary["reference_probes"].items():
        assert 0.0 <= accuracy <= 1.0, name
    assert summary["reference_probes"]["teacher_clean"] > 0.9  # the shipped teacher is really pretrained
    for line in ("[conditional]", "[unconditional]", "steps to baseline's final", "reference probes"):
        assert line in quick["stdout"]


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
def test_curves_have_one_finite_value_per_evaluation(quick, setting):
    res = quick["summary"]["settings"][setting]
    seeds = [str(s) for s in quick["summary"]["meta"]["seeds"]]
    assert res["steps"] == [0, 2, 4]
    for arm in ARMS:
        assert sorted(res["curves"][arm]) == sorted(seeds)
        for seed in seeds:
            curves = res["curves"][arm][seed]
            assert set(curves) == set(METRICS)
            for metric in METRICS:
                if arm == "baseline" and metric in REPA_ONLY:
                    assert curves[metric] is None  # no projector, nothing to compare
                    continue
                values = curves[metric]
                assert len(values) == len(res["steps"]) and _finite(values), (arm, seed, metric, values)
            assert all(0.0 <= v <= 1.0 for v in curves["probe"])
            assert all(v > 0.0 for v in curves["val_loss"])
            assert all(v >= -1e-6 for v in curves["fd"] + curves["fd_train"])
            if arm == "repa":
                assert all(-1.0 <= v <= 1.0 for v in curves["similarity"] + curves["similarity_null"])


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
def test_both_arms_start_from_the_same_model_and_noise(quick, setting):
    res = quick["summary"]["settings"][setting]
    assert res["checks"] == {"same_init": True, "same_first_loss": True}
    runs = res["runs"]
    seeds = list(runs["baseline"])
    for seed in seeds:
        assert runs["baseline"][seed]["init_fingerprint"] == runs["repa"][seed]["init_fingerprint"]
        assert runs["baseline"][seed]["first_train_loss"] == runs["repa"][seed]["first_train_loss"]
        assert runs["baseline"][seed]["final_fingerprint"] != runs["repa"][seed]["final_fingerprint"]  # REPA acted
        for arm in ARMS:  # step 0 is evaluated before any update: the same model in both arms
            for metric in COMPARED:
                assert res["curves"][arm][seed][metric][0] == res["curves"]["baseline"][seed][metric][0]
    assert runs["baseline"][seeds[0]]["init_fingerprint"] != runs["baseline"][seeds[1]]["init_fingerprint"]


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
def test_finals_and_steps_to_baseline_final_follow_from_the_curves(quick, setting):
    res = quick["summary"]["settings"][setting]
    steps, curves = res["steps"], res["curves"]
    seeds = list(curves["baseline"])
    for metric in METRICS:
        for arm in ARMS:
            final = res["final"][metric][arm]
            if curves[arm][seeds[0]][metric] is None:
                assert final is None
                continue
            lasts = [curves[arm][s][metric][-1] for s in seeds]
            assert final["per_seed"] == pytest.approx(lasts)
            assert final["mean"] == pytest.approx(sum(lasts) / len(lasts))
    assert all(res["steps_to_baseline_final"][metric] is None for metric in REPA_ONLY)
    for metric in COMPARED:
        higher = HIGHER_IS_BETTER[metric]
        got = res["steps_to_baseline_final"][metric]
        expected = {s: _first_reaching(steps, curves["repa"][s][metric], curves["baseline"][s][metric][-1], higher)
                    for s in seeds}
        assert got["per_seed"] == expected, metric
        reached = [v for v in expected.values() if v is not None]
        assert got["reached"] == len(reached)
        if len(reached) == len(seeds):
            assert got["mean"] == pytest.approx(sum(reached) / len(reached))
        else:
            assert got["mean"] is None
        mean_repa = [sum(curves["repa"][s][metric][i] for s in seeds) / len(seeds) for i in range(len(steps))]
        mean_base_final = sum(curves["baseline"][s][metric][-1] for s in seeds) / len(seeds)
        on_mean = _first_reaching(steps, mean_repa, mean_base_final, higher)
        assert got["mean_curves"] == on_mean, metric
        assert got["speedup_mean_curves"] == (steps[-1] / on_mean if on_mean else None)


@pytest.mark.slow
def test_plot_is_a_png(quick):
    from PIL import Image

    data = quick["png"].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(quick["png"]) as image:
        image.verify()
    with Image.open(quick["png"]) as image:
        width, height = image.size
    assert width > 1000 and height > 400  # a panel per metric, a row per setting


def test_evaluating_does_not_change_the_training_trajectory():
    """Evaluations every 2 steps and only at the end train the same weights: evaluation draws from its
    own generators, never from the global RNG that draws the training noise. The first run builds the
    evaluation data, the second reuses it (as a worker's later runs do): that must not change the
    projector's initialisation either."""
    bench = _benchmark()
    bench._EVAL_DATA.clear()
    evals = bench.EvalOptions(probe_train=40, val_repeats=1, fd_samples=8, sample_steps=1)
    often = bench.run_job(bench.Job("unconditional", "repa", 3, steps=4, eval_every=2, evals=evals))
    rarely = bench.run_job(bench.Job("unconditional", "repa", 3, steps=4, eval_every=4, evals=evals))
    assert often["steps"] == [0, 2, 4] and rarely["steps"] == [0, 4]
    assert often["final_fingerprint"] == rarely["final_fingerprint"]
    assert often["final_train_loss"] == rarely["final_train_loss"]
    for metric in ("val_loss", "probe", "fd", "fd_train", "similarity_null"):
        assert often["curves"][metric][-1] == rarely["curves"][metric][-1], metric


def test_frechet_distance_and_steps_to_reach():
    np = pytest.importorskip("numpy")
    bench = _benchmark()
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    stats = bench.gaussian_stats(a)
    assert bench.frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-6)
    shifted = bench.gaussian_stats(a + np.array([3.0, 0.0, 0.0, 4.0]))
    assert bench.frechet_distance(stats, shifted) == pytest.approx(25.0, abs=1e-6)  # |shift|^2, same covariance
    assert bench.steps_to_reach([0, 10, 20], [0.1, 0.5, 0.9], 0.5, higher_is_better=True) == 10
    assert bench.steps_to_reach([0, 10, 20], [0.9, 0.5, 0.1], 0.4, higher_is_better=False) == 20
    assert bench.steps_to_reach([0, 10, 20], [0.1, 0.2, 0.3], 0.5, higher_is_better=True) is None
