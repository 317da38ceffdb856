"""Where a method does not pay yet, find out why (issue 22, item 9): a small search over the budget,
``lam``, the aligned block, the schedule and warm-up and the teacher's fit to the data, within the
CPU limit, before the committed 5-seed run.

Each candidate is a budget and Hydra overrides of the method's experiment (unconditional setting).
It trains the aligned arm on ``--seeds`` paired seeds; the baseline of a seed is trained once per
budget and aligned block and shared by the candidates (the callback's options change nothing else).
The evaluations are the convergence benchmark's, made cheaper (``SEARCH_EVALS``: 500 FD samples of 4
Euler steps, the probe fit on 800 training samples, every 100 steps; clips: 200, i.e. 1,000 frames, and
600), and the summary is the same:
paired final differences and speedups (``common.py``). Results accumulate in ``--out`` (JSON, rewritten
after every run, so an interrupted search resumes) and the table goes to ``--markdown``.

``--probe-blocks`` trains (or reuses) the baseline of the first seed, saves it, and runs
``lightning-repa-probe`` on it (NULL label, the experiment's teacher) to choose the aligned block.

    python benchmarks/search.py --method crepa --out docs/search_crepa.json --markdown docs/search_crepa.md
    python benchmarks/search.py --method crepa --probe-blocks --out docs/search_crepa.json
    python benchmarks/search.py --method crepa --candidate "native_800:800:repa.encoder_image_size=20" \\
        --out docs/search_crepa.json --markdown docs/search_crepa.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BOOTSTRAP, fmt, fmt_ci, machine, markdown_table, summarize_metric, write_json  # noqa: E402
from convergence_eval import EvalOptions  # noqa: E402
from convergence_methods import METHODS  # noqa: E402
from convergence_report import HIGHER_IS_BETTER  # noqa: E402
from convergence_train import Job, compose, run_job  # noqa: E402

SEARCH_EVALS = EvalOptions(fd_samples=500, sample_steps=4, val_repeats=1, probe_train=800)
SEARCH_EVALS_VIDEO = replace(SEARCH_EVALS, fd_samples=200, probe_train=600, batch_size=50)  # 1,000 frames


@dataclass(frozen=True)
class Candidate:
    name: str
    steps: int
    overrides: tuple[str, ...]
    why: str = ""


# What is tried first; further candidates come from the command line once these are read.
CANDIDATES: dict[str, list[Candidate]] = {
    "repa": [Candidate("demo", 400, (), "the demo's setting (block 2, lam 0.5, constant)"),
             Candidate("lam1", 400, ("repa.lam=1.0",), "a stronger pull")],
    "urepa": [Candidate("demo", 400, (), "the demo's setting (mid block, lam 0.5, manifold 3, constant)"),
              Candidate("lam1", 400, ("repa.lam=1.0",), "a stronger pull"),
              Candidate("no_manifold", 400, ("repa.manifold_weight=0.0",), "REPA's cosine alone on the mid block"),
              Candidate("demo_800", 800, (), "twice the budget")],
    "crepa": [Candidate("demo", 400, (), "the demo's t2v preset (warm-up 100, cosine to 0.1, cutoff 0.85), block 1"),
              Candidate("constant", 400, ("schedule=i2v",), "no warm-up, no decay, no cutoff (the i2v preset)"),
              Candidate("native", 400, ("repa.encoder_image_size=20",),
                        "teacher at its training scale: 16x24 frames as they are, 8x12 tokens = the student's grid"),
              Candidate("constant_native", 400, ("schedule=i2v", "repa.encoder_image_size=20"), "both")],
}


def parse_candidate(text: str) -> Candidate:
    """``NAME:STEPS:override1,override2`` (overrides may be empty)."""
    try:
        name, steps, overrides = text.split(":", 2)
        return Candidate(name, int(steps), tuple(o for o in overrides.split(",") if o), "command line")
    except ValueError as error:
        raise SystemExit(f"--candidate must be NAME:STEPS:override1,override2, got {text!r} ({error})") from None


def block_of(method: str, overrides: Sequence[str]) -> Optional[int]:
    """The aligned block the experiment ends up with (the baseline's probe reads the same block)."""
    with tempfile.TemporaryDirectory() as tmp:
        block = compose(METHODS[method].experiment, 0, 400, tmp, overrides).repa.get("block_index")
    return None if block is None else int(block)


def run_key(arm: str, seed: int, steps: int, block: Optional[int], overrides: Sequence[str]) -> str:
    """What makes a run: the baseline depends on the budget and the probed block only."""
    return f"{arm}|{seed}|{steps}|{block}|" + (",".join(overrides) if arm == "aligned" else "")


def job_for(method: str, c: Candidate, arm: str, seed: int, eval_every: int, checkpoint: Optional[str] = None) -> Job:
    setting = replace(METHODS[method].setting(conditional=False), steps=c.steps, eval_every=eval_every, overrides=())
    block = block_of(method, c.overrides)
    extra = c.overrides if arm == "aligned" else (() if block is None else (f"repa.block_index={block}",))
    evals = SEARCH_EVALS_VIDEO if METHODS[method].video else SEARCH_EVALS
    return Job(setting, arm, seed, evals, extra, checkpoint=checkpoint)


def summarize(method: str, candidates: list[Candidate], runs: dict[str, Any], seeds: Sequence[int]) -> list[dict]:
    """One row per candidate whose runs are all there."""
    rows = []
    seen = sorted({int(k.split("|")[1]) for k in runs} | set(seeds))
    for c in candidates:
        block = block_of(method, c.overrides)
        done = [s for s in seen if all(run_key(arm, s, c.steps, block, c.overrides) in runs
                                       for arm in ("baseline", "aligned"))]
        if not done:
            continue
        seeds = done  # the paired seeds this candidate has (a budget tried on one seed only shows one)
        keys = {(arm, s): run_key(arm, s, c.steps, block, c.overrides)
                for arm in ("baseline", "aligned") for s in seeds}
        steps = runs[keys[("baseline", seeds[0])]]["steps"]
        curves = {arm: {str(s): runs[keys[(arm, s)]]["curves"] for s in seeds} for arm in ("baseline", "aligned")}
        summary = {m: summarize_metric(steps, {s: v[m] for s, v in curves["baseline"].items()},
                                       {s: v[m] for s, v in curves["aligned"].items()}, HIGHER_IS_BETTER[m])
                   for m in ("probe", "fd", "val_loss")}
        sims = [runs[keys[("aligned", s)]]["curves"]["similarity"][-1] for s in seeds]
        rows.append({"candidate": asdict(c), "block_index": block, "seeds": seeds, "summary": summary,
                     "final_similarity": [None if v is None else float(v) for v in sims],
                     "cpu_seconds": sum(runs[k]["cpu_seconds"] for k in keys.values() if k.startswith("aligned"))})
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        c, s = r["candidate"], r["summary"]
        cells = [c["name"], c["steps"], " ".join(c["overrides"]) or "(demo)",
                 "-" if r["block_index"] is None else r["block_index"], len(r["seeds"])]
        for m in ("probe", "fd", "val_loss"):
            d, sp = s[m]["paired_final_diff"], s[m]["speedup"]
            digits = 4 if m == "val_loss" else 3
            cells += [fmt_ci(d["mean"], d["ci95"], digits),
                      " ".join("never" if v is None else f"{v:.2f}" for v in sp["per_seed"].values())]
        cells.append(" ".join(fmt(v, 2) for v in r["final_similarity"]))
        out.append(cells)
    return markdown_table(["candidate", "steps", "overrides", "block", "seeds", "probe: aligned - base",
                           "probe speedup per seed",
                           "FD: aligned - base", "FD speedup per seed", "val loss: aligned - base",
                           "val loss speedup per seed", "final similarity"], out)


def probe_blocks(method: str, c: Candidate, seeds: Sequence[int], runs: dict[str, Any], save: Any,
                 probe_overrides: Sequence[str], eval_every: int) -> dict[str, Any]:
    """Train (or retrain) the first seed's baseline of candidate ``c`` with a checkpoint and probe its blocks."""
    with tempfile.TemporaryDirectory(prefix="repa_search_") as tmp:
        ckpt = os.path.join(tmp, "baseline.ckpt")
        job = job_for(method, c, "baseline", seeds[0], eval_every, checkpoint=ckpt)
        key = run_key("baseline", seeds[0], c.steps, block_of(method, c.overrides), c.overrides)
        runs[key] = run_job(job)
        save()
        spec = METHODS[method]
        cfg = compose(spec.experiment, seeds[0], c.steps, tmp)
        probe_dir = os.path.join(tmp, "probe")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent),
                                                            *filter(None, [os.environ.get("PYTHONPATH")])])}
        command = ["lightning-repa-probe", f"model={_group(spec.experiment, 'model')}",
                   f"data={_group(spec.experiment, 'data')}", f"family={cfg.repa.family}", f"ckpt_path={ckpt}",
                   "forward=convergence_methods.null_label_forward", f"paths.output_dir={probe_dir}",
                   f"seed={seeds[0]}", *probe_overrides]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        print(proc.stdout[-3000:], proc.stderr[-2000:] if proc.returncode else "", flush=True)
        if proc.returncode:
            raise SystemExit(f"lightning-repa-probe failed ({proc.returncode})")
        result = json.loads(Path(probe_dir, "probe.json").read_text())
    shown = [c for c in command if not c.startswith(("ckpt_path=", "paths.output_dir="))]
    result["checkpoint"] = "<the seed's trained baseline>"
    return {"command": " ".join([*shown, "ckpt_path=<the seed's trained baseline>"]), "result": result}


def _group(experiment: str, group: str) -> str:
    """The ``model/`` or ``data/`` choice an experiment makes (read from its YAML's defaults)."""
    import importlib.resources

    text = (importlib.resources.files("lightning_repa.conf") / "experiment" / f"{experiment}.yaml").read_text()
    for line in text.splitlines():
        if line.strip().startswith(f"- override /{group}:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    raise SystemExit(f"experiment {experiment} names no {group}/")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--candidate", action="append", default=[], help="NAME:STEPS:overrides (instead of the table)")
    p.add_argument("--probe-blocks", action="store_true", help="probe the blocks of a trained baseline first")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--probe-override", nargs="*", default=[], help="Hydra overrides of lightning-repa-probe")
    p.add_argument("--out", type=Path, required=True, help="the search's JSON (read first: done runs are kept)")
    p.add_argument("--markdown", type=Path, help="write the table here")
    args = p.parse_args(argv)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}, "candidates": [], "probe": None}
    runs: dict[str, Any] = doc["runs"]
    known = [Candidate(c["name"], c["steps"], tuple(c["overrides"]), c.get("why", "")) for c in doc["candidates"]]
    new = [parse_candidate(t) for t in args.candidate] if args.candidate else CANDIDATES[args.method]
    candidates = known + [c for c in new if c not in known]

    def save() -> None:
        rows = summarize(args.method, candidates, runs, args.seeds)
        evals = SEARCH_EVALS_VIDEO if METHODS[args.method].video else SEARCH_EVALS
        write_json(args.out, {"method": args.method, "seeds": args.seeds, "evals": asdict(evals),
                              "eval_every": args.eval_every, "bootstrap": BOOTSTRAP, "meta": machine(),
                              "candidates": [asdict(c) for c in candidates], "probe": doc.get("probe"),
                              "rows": rows, "runs": runs})
        if args.markdown is not None and rows:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(table(rows) + "\n")

    if args.probe_blocks:
        doc["probe"] = probe_blocks(args.method, new[0], args.seeds, runs, save, args.probe_override, args.eval_every)
        save()
    for c in new:
        block = block_of(args.method, c.overrides)
        for seed in args.seeds:
            for arm in ("baseline", "aligned"):
                key = run_key(arm, seed, c.steps, block, c.overrides)
                if key in runs:
                    continue
                r = run_job(job_for(args.method, c, arm, seed, args.eval_every))
                runs[key] = r
                print(f"{c.name} {arm} seed {seed}: {r['cpu_seconds']:.0f} s CPU; "
                      f"final probe {r['curves']['probe'][-1]:.3f}, "
                      f"fd {r['curves']['fd'][-1]:.2f}, val_loss {r['curves']['val_loss'][-1]:.4f}", flush=True)
                save()
    save()
    rows = summarize(args.method, candidates, runs, args.seeds)
    print(table(rows))


if __name__ == "__main__":
    main()
