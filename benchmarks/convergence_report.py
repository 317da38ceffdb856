"""The convergence benchmark's summary, table and plot, computed from the runs' curves alone (so that
``--from-json`` redraws them and a reader can recompute every number from the committed curves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from common import LAST, bootstrap_ci, first_reach, fmt, fmt_ci, markdown_table, mean_ci, summarize_metric

METRICS = ("val_loss", "probe", "fd", "fd_train")  # both arms have them; summarised
HIGHER_IS_BETTER = {"val_loss": False, "probe": True, "fd": False, "fd_train": False}
ALIGNED_ONLY = ("similarity", "weight")  # the baseline has no callback: None
LABELS = {"val_loss": "held-out denoising loss", "probe": "linear probe of the aligned block (t=0.5)",
          "fd": "FD to held-out (teacher space)", "fd_train": "FD to training frames (teacher space)"}
PANELS = ("probe", "fd", "val_loss")
ARM_NAMES = {"repa": "REPA", "urepa": "U-REPA", "crepa": "CREPA"}


def summarize_setting(runs: list[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Curves per arm and seed, the per-metric summary (speedups, paired final differences), the
    probe-t sweep, the pairing checks and each run's cost, of one setting."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    first = by[("baseline", seeds[0])]
    steps = first["steps"]
    curves = {arm: {str(s): by[(arm, s)]["curves"] for s in seeds} for arm in ("baseline", "aligned")}
    summary = {m: summarize_metric(steps, {s: c[m] for s, c in curves["baseline"].items()},
                                   {s: c[m] for s, c in curves["aligned"].items()}, HIGHER_IS_BETTER[m])
               for m in METRICS}
    sweep = {}
    for t in first["probe_t"]:
        base = [by[("baseline", s)]["probe_t"][t] for s in seeds]
        al = [by[("aligned", s)]["probe_t"][t] for s in seeds]
        sweep[t] = {"baseline": mean_ci(base), "aligned": mean_ci(al),
                    "paired_diff": mean_ci([a - b for a, b in zip(al, base)])}
    checks = {
        "same_init": all(by[("baseline", s)]["init_fingerprint"] == by[("aligned", s)]["init_fingerprint"]
                         for s in seeds),
        "same_first_loss": all(by[("baseline", s)]["first_train_loss"] == by[("aligned", s)]["first_train_loss"]
                               for s in seeds),
    }
    kept = ("init_fingerprint", "final_fingerprint", "first_train_loss", "final_train_loss", "parameters", "seconds",
            "eval_seconds", "cpu_seconds")
    return {
        "method": first["method"], "steps": steps, "overrides": first["overrides"], "block_index": first["block_index"],
        "curves": curves, "summary": summary, "probe_t_sweep": {"at_step": steps[-1], "t": sweep},
        "checks": checks, "runs": {arm: {str(s): {k: by[(arm, s)][k] for k in kept} for s in seeds}
                                   for arm in ("baseline", "aligned")},
        "cost": {"cpu_seconds": sum(r["cpu_seconds"] for r in runs), "run_seconds": sum(r["seconds"] for r in runs)},
    }


def _speedup_cell(sp: dict[str, Any]) -> str:
    per = " ".join("never" if v is None else f"{v:.2f}" for v in sp["per_seed"].values())
    return f"{fmt_ci(sp['mean'], sp['ci95'], 2)} ({sp['reached']}/{sp['seeds']} reached: {per})"


def format_table(document: dict[str, Any]) -> str:
    """Plain text: per setting, the finals with intervals, the paired difference and the speedups."""
    lines = []
    for name, res in document["settings"].items():
        ref = document["reference_probes"].get(res["method"], {})
        noisy = ref.get("noisy_input", {}).get("0.5")
        lines += ["", f"[{name}] {len(res['runs']['baseline'])} seeds, evaluations at {res['steps']}; overrides "
                  f"{' '.join(res['overrides']) or '(none)'}; probe on the noisy input {fmt(noisy)}, teacher "
                  f"{fmt(ref.get('teacher_clean'))}",
                  f"{'metric':<9} {'baseline':>24} {'aligned':>24} {'aligned-base':>26}   "
                  "speedup (mean [95% CI], reached)"]
        for m in METRICS:
            s = res["summary"][m]
            lines.append(f"{m:<9} {fmt_ci(s['final']['baseline']['mean'], s['final']['baseline']['ci95']):>24} "
                         f"{fmt_ci(s['final']['aligned']['mean'], s['final']['aligned']['ci95']):>24} "
                         f"{fmt_ci(s['paired_final_diff']['mean'], s['paired_final_diff']['ci95']):>26}   "
                         f"{_speedup_cell(s['speedup'])}")
        sweep = res["probe_t_sweep"]["t"]
        lines.append("probe at step {}: ".format(res["probe_t_sweep"]["at_step"]) + "; ".join(
            f"t={t}: {fmt(v['baseline']['mean'])} -> {fmt(v['aligned']['mean'])} "
            f"(diff {fmt_ci(v['paired_diff']['mean'], v['paired_diff']['ci95'])})" for t, v in sweep.items()))
        c = res["checks"]
        lines.append(f"same init in both arms: {c['same_init']}; same first training loss: {c['same_first_loss']}; "
                     f"CPU {res['cost']['cpu_seconds'] / 60:.1f} min")
    return "\n".join(lines)


def markdown(document: dict[str, Any]) -> str:
    """The README's tables: one per setting."""
    out = []
    for name, res in document["settings"].items():
        rows = []
        for m in METRICS:
            s = res["summary"][m]
            sp = s["speedup"]
            rows.append([LABELS[m], fmt_ci(s["final"]["baseline"]["mean"], s["final"]["baseline"]["ci95"]),
                         fmt_ci(s["final"]["aligned"]["mean"], s["final"]["aligned"]["ci95"]),
                         fmt_ci(s["paired_final_diff"]["mean"], s["paired_final_diff"]["ci95"]),
                         fmt_ci(sp["mean"], sp["ci95"], 2), f"{sp['reached']} of {sp['seeds']}"])
        out += [f"**{name}** ({ARM_NAMES[res['method']]}, {len(res['runs']['baseline'])} paired seeds, "
                f"{res['steps'][-1]} steps)", "",
                markdown_table(["metric", "baseline final", "aligned final", "aligned - baseline", "speedup",
                                "seeds reaching"], rows), ""]
    return "\n".join(out)


def _mean_band(curves: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seed mean per step and its 95 % bootstrap band (resampling seeds)."""
    arr = np.asarray(curves, dtype=float)  # (seeds, steps)
    lo, hi = zip(*[bootstrap_ci(arr[:, i], resamples=2000) for i in range(arr.shape[1])])
    return arr.mean(axis=0), np.asarray(lo), np.asarray(hi)


def _panel(ax: Any, res: dict[str, Any], metric: str, noisy_probe: Optional[float]) -> None:
    steps, higher = res["steps"], HIGHER_IS_BETTER[metric]
    target = float(np.mean([np.mean(c[metric][-LAST:]) for c in res["curves"]["baseline"].values()]))
    colours = {"baseline": "tab:blue", "aligned": "tab:orange"}
    label = ARM_NAMES[res["method"]]
    for arm in ("baseline", "aligned"):
        mean, lo, hi = _mean_band([c[metric] for c in res["curves"][arm].values()])
        ax.plot(steps, mean, color=colours[arm], marker=".", ms=4, label="baseline" if arm == "baseline" else label)
        ax.fill_between(steps, lo, hi, color=colours[arm], alpha=0.2)
        reach = first_reach(steps, mean.tolist(), target, higher)
        if reach is not None:
            ax.axvline(reach, color=colours[arm], ls=":", lw=1)
            ax.plot([reach], [mean[steps.index(reach)]], marker="o", mfc="none", ms=9, color=colours[arm])
    ax.axhline(target, color="0.3", ls="--", lw=1, label=f"baseline final (mean of last {LAST})")
    if metric == "probe" and noisy_probe is not None:
        ax.axhline(noisy_probe, color="0.6", ls="-.", lw=1, label="probe on the noisy input")
    ax.set_title(f"{LABELS[metric]}\n({'higher' if higher else 'lower'} is better)", fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot(document: dict[str, Any], path: Path) -> Path:
    """One row per setting (probe, FD, held-out loss against steps): seed means with a 95 % band, the
    baseline's final level dashed, and where each arm's mean curve first reaches it circled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = list(document["settings"])
    fig = Figure(figsize=(4.2 * len(PANELS), 3.4 * len(settings) + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(settings), len(PANELS), squeeze=False)
    for row, name in enumerate(settings):
        res = document["settings"][name]
        noisy = document["reference_probes"].get(res["method"], {}).get("noisy_input", {}).get("0.5")
        for col, metric in enumerate(PANELS):
            _panel(axes[row, col], res, metric, noisy)
        axes[row, 0].set_ylabel(f"{name}\n({len(res['runs']['baseline'])} seeds)", fontsize=9)
    fig.suptitle("Aligned vs baseline on the package's CPU demos: seed means, 95 % bootstrap bands")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
