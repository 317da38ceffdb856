"""`benchmarks/overhead.py --quick`: runs end to end and writes a consistent JSON (no timing is asserted)."""

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

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
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
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout, scratch


def test_the_json_has_the_issue_keys_and_positive_finite_numbers(quick_run):
    data, _, _ = quick_run
    assert {"baseline_ms", "ratio", "decode_encode_ms", "peak_mb"} <= set(data)
    assert set(data["ratio"]) == set(MODES)
    assert _positive(data["baseline_ms"]) and _positive(data["decode_encode_ms"]) and _positive(data["align_ms"])
    assert all(_positive(data["ratio"][m]) and _positive(data["ratio_min"][m]) for m in MODES)
    assert set(data["peak_mb"]) == {"baseline", *MODES} and all(map(_positive, data["peak_mb"].values()))
    assert all(_positive(data["repa_host_ms"][m]) and _positive(data["ratio_paired"][m]) for m in MODES)
    steps = data["steps_ms"]  # every step of every mode and probe, aligned by turn of the ring
    assert {len(v) for v in steps.values()} == {data["setup"]["repeats"] * data["setup"]["steps"]}
    assert all(_positive(x) for v in steps.values() for x in v)


def test_the_ratios_are_the_reported_times_over_the_baseline(quick_run):
    data, _, _ = quick_run
    ms = data["ms"]
    assert data["baseline_ms"] == ms["baseline"]["median"]
    assert data["decode_encode_ms"] == ms["decode_encode"]["median"]
    for mode in MODES:
        assert len(ms[mode]["rounds"]) == data["setup"]["repeats"] == 2
        assert min(ms[mode]["rounds"]) == ms[mode]["min"] <= ms[mode]["median"] <= max(ms[mode]["rounds"])
        assert data["ratio"][mode] == pytest.approx(ms[mode]["median"] / ms["baseline"]["median"], rel=1e-12)
        assert data["ratio_min"][mode] == pytest.approx(ms[mode]["min"] / ms["baseline"]["min"], rel=1e-12)
    overhead = ms["uncached"]["median"] - data["baseline_ms"]
    assert data["uncached_overhead_ms"] == pytest.approx(overhead, rel=1e-12)
    assert data["uncached_overhead_vs_decode_encode"] == pytest.approx(overhead / data["decode_encode_ms"], rel=1e-12)
    steps = data["steps_ms"]  # the paired ratios: median over steps of step / the baseline's step of the same turn
    for mode in MODES:
        pairs = [x / b for x, b in zip(steps[mode], steps["baseline"])]
        assert data["ratio_paired"][mode] == pytest.approx(statistics.median(pairs), rel=1e-9)
    targets = data["targets"]
    assert targets["cached"]["value"] == data["ratio_paired"]["cached"] and targets["cached"]["limit"] == 1.05
    assert targets["weight0"]["value"] == data["ratio_paired"]["weight0"] and targets["weight0"]["limit"] == 1.01
    assert targets["uncached_vs_decode_encode"]["value"] == data["uncached_overhead_vs_decode_encode_paired"]
    assert all(t["met"] == (t["value"] <= t["limit"]) for t in targets.values())


def test_the_run_measured_what_it_says(quick_run):
    data, stdout, _ = quick_run
    setup = data["setup"]
    assert setup["family"] == "pixart" and setup["decoder"] == "vae" and setup["denoiser"] == "PixArtTransformer2DModel"
    samples = setup["batches"] * setup["batch_size"]
    assert data["setup"]["cache"] == {"misses": samples, "hits": setup["steps"] * setup["batch_size"]}  # warm
    assert data["peak_mb"]["uncached"] > data["peak_mb"]["baseline"]  # the ViT-S/14 teacher alone is ~88 MB
    assert list(data["families"]) == ["pixart"] and data["families"]["pixart"]["ratio"] == data["ratio"]
    labels = ("baseline", "uncached", "cached", "weight0", "decode+encode", "x base(med)", "PixArtTransformer2DModel")
    assert all(label in stdout for label in labels)


def test_the_checkpoint_is_written_to_a_temporary_directory_and_removed(quick_run):
    data, _, scratch = quick_run
    assert not list(scratch.glob("repa_overhead_*")) and not list(scratch.rglob("*.pth"))  # (torch may leave a cache)
    assert str(scratch) not in json.dumps(data)  # nor is the temporary path recorded
