"""`benchmarks/overhead.py --quick`: runs end to end at two sizes and writes a consistent JSON (no timing
is asserted), its cache rates come from `lightning-repa-cache`, and the GPU scripts refuse to run
without CUDA, saying so."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "overhead.py"
MODES = ("uncached", "cached", "weight0")


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """One `--quick --json` run in a scratch working directory with its own TMPDIR."""
    work = tmp_path_factory.mktemp("overhead")
    scratch = work / "tmp"
    scratch.mkdir()
    out = work / "out" / "overhead.json"
    env = {**os.environ, "TMPDIR": str(scratch), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out)], cwd=work,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout, scratch


@pytest.mark.slow
def test_two_sizes_with_positive_finite_numbers(quick_run):
    data, stdout, _ = quick_run
    assert list(data["runs"]) == ["pixart/base", "pixart/4x"]
    base, big = data["runs"]["pixart/base"], data["runs"]["pixart/4x"]
    ratio = big["setup"]["denoiser_params_m"] / base["setup"]["denoiser_params_m"]
    assert 3.0 < ratio < 4.5, ratio  # twice the width: about 4x the parameters
    for r in data["runs"].values():
        assert _positive(r["baseline_ms"]) and _positive(r["decode_encode_ms"]) and _positive(r["align_ms"])
        assert all(_positive(r["ratio"][m]) and _positive(r["ratio_paired"][m]) for m in MODES)
        assert set(r["peak_mb"]) == {"baseline", *MODES} and all(map(_positive, r["peak_mb"].values()))
        steps = r["steps_ms"]  # rounds x steps of every mode and probe, aligned by turn of the ring
        assert {len(rounds) for rounds in steps.values()} == {2}
        assert {len(x) for rounds in steps.values() for x in rounds} == {r["setup"]["steps"]}
    for label in ("baseline", "uncached", "cached", "weight0", "decode+encode", "PixArtTransformer2DModel", "95% CI"):
        assert label in stdout


@pytest.mark.slow
def test_ratios_intervals_and_targets_follow_from_the_steps(quick_run):
    data, _, _ = quick_run
    for r in data["runs"].values():
        steps = r["steps_ms"]
        for mode in MODES:
            pairs = [x / b for rx, rb in zip(steps[mode], steps["baseline"]) for x, b in zip(rx, rb)]
            assert r["ratio_paired"][mode] == pytest.approx(statistics.median(pairs), rel=1e-9)
            lo, hi = r["ratio_paired_ci95"][mode]
            assert min(pairs) - 1e-9 <= lo <= hi <= max(pairs) + 1e-9
            medians = [statistics.median(x) for x in steps[mode]]
            assert r["ms"][mode]["median"] == pytest.approx(statistics.median(medians), rel=1e-9)
            assert r["ratio"][mode] == pytest.approx(r["ms"][mode]["median"] / r["ms"]["baseline"]["median"], rel=1e-9)
        t = r["targets"]
        assert t["cached"]["upper"] == r["ratio_paired_ci95"]["cached"][1] and t["cached"]["limit"] == 1.05
        assert t["weight0"]["upper"] == r["ratio_paired_ci95"]["weight0"][1] and t["weight0"]["limit"] == 1.01
        assert all(x["met"] == (x["upper"] <= x["limit"]) for x in t.values())
        samples = r["setup"]["batches"] * r["setup"]["batch_size"]
        cache = r["setup"]["cache"]
        assert cache["misses"] in (None, samples)  # warm: every sample computed once, in the untimed epoch


@pytest.mark.slow
def test_cache_rates_come_from_lightning_repa_cache(quick_run):
    data, _, scratch = quick_run
    rates = data["cache_rates"]
    for name in ("demo", "vits14_224"):
        r = rates[name]
        assert r["fill"]["computed"] == r["fill"]["samples"] > 0 and r["read"]["computed"] == 0
        assert r["read"]["cached"] == r["fill"]["samples"]  # the second command found every sample
        assert r["cache_bytes"] > 0
        for phase, count in (("fill", r["fill"]["computed"]), ("read", r["read"]["samples"])):
            got, seconds = r[f"{phase}_rate"], r[phase]["seconds"]
            assert _positive(got["samples_per_s"])
            # the command prints 0.1 s: a 0.0 is a lower bound from 0.05 s
            assert got["samples_per_s"] == pytest.approx(count / seconds if seconds > 0 else count / 0.05)
            assert got["at_least"] == (seconds == 0)
    assert not list(scratch.glob("repa_*")) and not list(scratch.rglob("*.pth"))  # temporary files removed
    assert str(scratch) not in json.dumps(data)  # nor is a temporary path recorded


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("command", [["overhead.py", "--device", "cuda"], ["gpu_checks.py"]])
def test_gpu_scripts_fail_clearly_without_cuda(command):
    proc = subprocess.run([sys.executable, str(BENCH / command[0]), *command[1:]], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "CUDA" in proc.stdout + proc.stderr
