"""The notebooks run top to bottom on CPU, offline, in a scratch directory (SPEC section 11)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, cwd: Path, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: predictable on a shared machine
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    for var, sub in (("IPYTHONDIR", "ipython"), ("JUPYTER_RUNTIME_DIR", "jupyter/runtime"),
                     ("JUPYTER_DATA_DIR", "jupyter/data"), ("JUPYTER_CONFIG_DIR", "jupyter/config"),
                     ("MPLCONFIGDIR", "matplotlib")):  # the kernel's own files stay in the test's directory
        (cwd / ".home" / sub).mkdir(parents=True, exist_ok=True)  # IPython warns when the parent does not exist
        monkeypatch.setenv(var, str(cwd / ".home" / sub))
    before = set(Path(tempfile.gettempdir()).iterdir())
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    assert time.perf_counter() - start < 120, f"{name} is meant to run in well under a minute"
    left = [p.name for p in set(Path(tempfile.gettempdir()).iterdir()) - before if p.name.startswith("repa_")]
    assert left == [], f"{name} left {left} behind"
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_quickstart_trains_with_repa_and_plots(tmp_path, monkeypatch):
    nb = _execute("quickstart.ipynb", tmp_path, monkeypatch)
    text = _text(nb)
    assert "REPA: family=flux, block 2 of 4" in text
    assert "'repa/similarity'" in text and "'repa/weight': 0.5" in text
    assert _images(nb) == 2  # the training curves and the weight schedules
    assert not (tmp_path / "lightning_logs").exists()  # it writes into its own temporary directory


@pytest.mark.slow
def test_family_tour_covers_every_family(tmp_path, monkeypatch):
    from lightning_repa.models.families import FAMILIES

    nb = _execute("family_tour.ipynb", tmp_path, monkeypatch)
    text = _text(nb)
    for name, family in FAMILIES.items():
        assert f"family={name:9} method={family.method.value:5}" in text
        assert f"RepaCallback(family={name!r}).block_index = {family.default_block_index}" in text
    assert "IndexError: block index 8 is out of range for family='flux'" in text
