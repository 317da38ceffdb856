"""The probe's result as a table, a JSON file and a plot (`lightning_repa.diagnostics.probe`).

The plot needs matplotlib, an optional dependency (`pip install "lightning_repa[demo]"`); without
it `plot` raises an ImportError that says so and `write_outputs` writes the JSON alone.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from lightning_repa.diagnostics.suggest import suggestion_window

__all__ = ["format_table", "plot", "write_outputs"]


def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's Agg canvas and Figure, or an ImportError naming the extra that installs it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError('the probe plot needs matplotlib: pip install "lightning_repa[demo]"') from None
    return FigureCanvasAgg, Figure


def _cell(value: Optional[float]) -> str:
    return "   nan" if value is None or math.isnan(value) else f"{value:6.3f}"


def format_table(result: Mapping[str, Any]) -> str:
    """The result as a text table: one row per block, CKNNA and CKA per noise level and their means."""
    levels = result["noise_levels"]
    head = [f"t={t:.2f}" for t in levels]
    width = 7 * (len(levels) + 1)
    title = (f"{result['family']}: {result['num_blocks']} blocks, {result['num_samples']} samples, "
             f"CKNNA k={result['k']}{' (L2-normalised)' if result['normalize'] else ''}, linear CKA")
    lines = [
        title,
        f"{'':>6} | {'CKNNA':^{width - 1}}| {'CKA':^{width - 1}}",
        f"{'block':>6} | " + " ".join(f"{h:>6}" for h in [*head, "mean"]) + " | "
        + " ".join(f"{h:>6}" for h in [*head, "mean"]),
    ]
    window = suggestion_window(result["num_blocks"], result["depth_fraction"])
    for block in result["blocks"]:
        index = block["index"]
        note = "  <- suggested" if index == result["suggested_block"] else ("  (late)" if index >= window else "")
        lines.append(
            f"{index:>6} | " + " ".join(_cell(v) for v in [*block["cknna"], block["cknna_mean"]]) + " | "
            + " ".join(_cell(v) for v in [*block["cka"], block["cka_mean"]]) + note
        )
    lines.append(f"suggested block: {result['suggested_block']}   ({result['rule']})")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def plot(result: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """A PNG of CKNNA and CKA against block index (one line per noise level, the mean in black, the
    suggested block marked, the blocks outside the suggestion's window shaded). Needs matplotlib;
    no pyplot state is touched (an Agg canvas of its own). `result` may be a loaded `probe.json`."""
    FigureCanvasAgg, Figure = _matplotlib()

    blocks = result["blocks"]
    x = [b["index"] for b in blocks]
    fig = Figure(figsize=(10, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    window = suggestion_window(result["num_blocks"], result["depth_fraction"])
    for ax, key, label in zip(fig.subplots(1, 2), ("cknna", "cka"), (f"CKNNA (k={result['k']})", "linear CKA")):
        for j, t in enumerate(result["noise_levels"]):
            ax.plot(x, [_nan(b[key][j]) for b in blocks], marker="o", ms=3, lw=1, label=f"t = {t:.2f}")
        ax.plot(x, [_nan(b[f"{key}_mean"]) for b in blocks], color="black", lw=2, label="mean")
        if window < len(blocks):
            ax.axvspan(window - 0.5, len(blocks) - 0.5, color="0.9", zorder=0, label="not suggested (late)")
        if result["suggested_block"] is not None:
            ax.axvline(result["suggested_block"], color="tab:red", ls="--", lw=1,
                       label=f"suggested: {result['suggested_block']}")
        ax.set_xlabel("block index")
        ax.set_ylabel(label)
        ax.set_title(f"{label} with the teacher")
        ax.grid(alpha=0.3)
        if len(x) <= 30:
            ax.set_xticks(x)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.suptitle(f"{result['family']}: {result['num_samples']} samples, token-averaged features")
    path = Path(path)
    fig.savefig(path)
    return path


def _nan(value: Optional[float]) -> float:
    return math.nan if value is None else value


def write_outputs(result: Mapping[str, Any], output_dir: Union[str, os.PathLike]) -> tuple[Path, Optional[Path]]:
    """Write `probe.json` and `probe.png` into `output_dir`; the PNG is skipped (None, with a note)
    when matplotlib is not installed."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "probe.json"
    json_path.write_text(json.dumps(_jsonable({k: v for k, v in result.items() if k != "files"}), indent=2) + "\n")
    try:
        png_path: Optional[Path] = plot(result, out / "probe.png")
    except ImportError as error:
        print(f"probe: no plot was written: {error}")
        png_path = None
    return json_path, png_path
