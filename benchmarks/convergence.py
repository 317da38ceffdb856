"""Does alignment make the package's demos converge sooner? Paired training curves with and without the
callback, for REPA, U-REPA and CREPA, with honest speedups and bootstrap intervals over seeds.

Each method trains its CPU demo from scratch in two arms that differ only by ``RepaCallback``
(``convergence_train.py``): REPA on the digits DiT (``experiment=demo``), U-REPA on the digits UNet
(``experiment=demo_unet``, mid block), CREPA on the sliding-digit clips with the Wan DiT
(``experiment=demo_video``). Every method runs unconditionally (every training label replaced by the
NULL label, so the label cannot carry the class); REPA also keeps the demo's class-conditional
setting as a second row. Settings, budgets and the overrides found by the search are in
``convergence_methods.py``; what each evaluation measures is in ``convergence_eval.py``
(``val_loss``, ``probe``, ``fd``, ``fd_train``, and the probe-t sweep at the final step).

Per seed and metric the speedup is ``b / a`` (``common.py``: ``F`` the mean of the baseline's last 3
evaluations, ``b`` the first step the baseline reaches it, ``a`` the first step the aligned arm does;
None if never), with the mean over seeds and a 95 % bootstrap interval; the same for the paired final
difference (aligned minus baseline). ``convergence_report.py`` prints the table and draws the plot.

    python benchmarks/convergence.py --workers 2 --runs-dir docs/convergence_runs --json docs/convergence.json \\
        --plot docs/convergence.png --markdown docs/convergence.md      # the committed run: about 5 h on 2 cores
    python benchmarks/convergence.py --method crepa --quick --json /tmp/c.json     # a tiny run, < 3 min
    python benchmarks/convergence.py --method repa --settings unconditional --seeds 0 1 --steps 800 \\
        --override repa.lam=1.0                                 # Hydra overrides of the experiment
    python benchmarks/convergence.py --runs-dir docs/convergence_runs --finished-only --json /tmp/c.json
    python benchmarks/convergence.py --from-json docs/convergence.json --plot docs/convergence.png

Runs are spread over ``--workers`` processes, one torch (and BLAS) thread each, longest first; the
JSON records each run's wall and CPU time and each method's. Nothing is written unless ``--json`` /
``--plot`` / ``--markdown`` / ``--runs-dir`` say where; with ``--runs-dir`` every finished run is kept
as it ends, and the same command run again reuses them (a long run survives an interruption).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark's own modules, when imported

from common import BOOTSTRAP, LAST, jsonable, machine, write_json  # noqa: E402
from convergence_eval import EvalOptions  # noqa: E402
from convergence_methods import CONDITIONAL, METHODS, UNCONDITIONAL, Setting, settings_for  # noqa: E402
from convergence_report import HIGHER_IS_BETTER, format_table, markdown, plot, summarize_setting  # noqa: E402
from convergence_train import ARMS, Job, run_job, run_reference  # noqa: E402

QUICK = dict(steps=6, eval_every=2, fd_samples=32, sample_steps=2, val_repeats=1, probe_train=100, batch_size=64)
QUICK_OVERRIDES = ("repa.warmup_steps=0",)  # the t2v preset's 100 warm-up steps need a longer run


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    d = EvalOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--settings", nargs="+", choices=(UNCONDITIONAL, CONDITIONAL), default=[UNCONDITIONAL, CONDITIONAL],
                   help="which rows of each method (U-REPA and CREPA have an unconditional one only)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, help="optimizer steps of every setting (default: each setting's own)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: each setting's own)")
    p.add_argument("--fd-samples", type=int, help=f"generated samples per FD (default {d.fd_samples}; clips 200, "
                                                 "of 5 frames each)")
    p.add_argument("--sample-steps", type=int, help=f"Euler steps of the FD sampler (default {d.sample_steps})")
    p.add_argument("--guidance", type=float, help=f"guidance of conditional sampling (default {d.guidance})")
    p.add_argument("--val-repeats", type=int, help=f"noise draws of the held-out loss (default {d.val_repeats})")
    p.add_argument("--probe-train", type=int, help=f"training samples the probe fits (default {d.probe_train}; "
                                                  "clips 600; 0: all)")
    p.add_argument("--batch-size", type=int, help=f"evaluation batch size (default {d.batch_size}; clips 50)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Hydra overrides of every setting's experiment, after the setting's own")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: report the runs already in --runs-dir (each setting over its seeds that have "
                        "both arms; a setting with fewer than 2 is left out), e.g. while a long run goes on")
    p.add_argument("--workers", type=int, default=1, help="processes, one torch thread each")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run of every code path: 2 seeds, 6 steps, small evaluations")
    p.add_argument("--from-json", type=Path, help="train nothing: print (and --plot) a JSON this script wrote")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write the PNG of the curves here")
    p.add_argument("--markdown", type=Path, help="write the per-setting tables (markdown) here")
    p.add_argument("--runs-dir", type=Path,
                   help="write each finished run here as it ends, and reuse the runs already there whose setting, "
                        "evaluation and overrides match (an interrupted command resumes where it stopped)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:2]
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.override = [*QUICK_OVERRIDES, *args.override]
    if (args.steps is not None and args.steps < 1) or (args.eval_every is not None and args.eval_every < 1):
        p.error("--steps and --eval-every must be >= 1")
    if (args.fd_samples or 3) < 3 or (args.sample_steps or 1) < 1:
        p.error("--fd-samples must be >= 3 and --sample-steps >= 1")
    if args.finished_only and args.runs_dir is None:
        p.error("--finished-only reports the runs of --runs-dir: give --runs-dir")
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        p.error(f"--seeds must be at least 2 distinct seeds (intervals are over seeds), got {args.seeds}")
    return args


def make_settings(args: argparse.Namespace) -> list[Setting]:
    """The settings to run, with the command line's budget when it gives one."""
    out = []
    for s in settings_for(args.method, args.settings):
        s = replace(s, steps=args.steps or s.steps, eval_every=args.eval_every or s.eval_every)
        if len(range(s.eval_every, s.steps + 1, s.eval_every)) < LAST:
            raise SystemExit(f"{s.name}: {s.steps} steps with --eval-every {s.eval_every} give fewer than {LAST} "
                             "evaluations; a final value is the mean of the last 3")
        out.append(s)
    if not out:
        raise SystemExit(f"no setting of {args.method} is {' or '.join(args.settings)}")
    return out


EVAL_FLAGS = ("fd_samples", "sample_steps", "guidance", "val_repeats", "probe_train", "batch_size")


def evals_for(method: str, args: argparse.Namespace) -> EvalOptions:
    """The evaluation of a method: the defaults, the method's own (clips), then the command line's."""
    given = {k: getattr(args, k) for k in EVAL_FLAGS if getattr(args, k) is not None}
    return replace(EvalOptions(), **{**dict(METHODS[method].evals), **given})


def job_key(job: Job) -> str:
    """What makes a finished run reusable: its setting, arm, seed, evaluation and overrides."""
    text = repr((job.setting, job.arm, job.seed, job.evals, job.extra))
    return hashlib.sha1(text.encode()).hexdigest()


def run_path(runs_dir: Path, job: Job) -> Path:
    return runs_dir / f"{job.setting.name}-{job.arm}-seed{job.seed}.json"


def load_finished(jobs: list[Job], runs_dir: Optional[Path]) -> tuple[list[dict[str, Any]], list[Job]]:
    """The runs of ``jobs`` already in ``runs_dir`` (same key), and the jobs still to run."""
    done, todo = [], []
    for job in jobs:
        path = None if runs_dir is None else run_path(runs_dir, job)
        record = json.loads(path.read_text()) if path is not None and path.is_file() else None
        if record is not None and record.get("job_key") == job_key(job):
            done.append(record)
        else:
            todo.append(job)
    return done, todo


def run_all(jobs: list[Job], workers: int, runs_dir: Optional[Path] = None) -> list[dict[str, Any]]:
    """Run the jobs, ``workers`` at a time (in this process when 1), printing one line per run; with
    ``runs_dir``, reuse the runs already there and write each new one as it finishes."""
    results, todo = load_finished(jobs, runs_dir)
    if results:
        print(f"reusing {len(results)} finished run(s) from {runs_dir}; {len(todo)} to run", flush=True)
    keys = {id(job): job_key(job) for job in todo}

    def report(r: dict[str, Any], job: Job) -> None:
        r = json.loads(json.dumps(jsonable(r)))  # as a reused run reads (e.g. the probe-t keys become strings)
        results.append(r)
        if runs_dir is not None:
            r["job_key"] = keys[id(job)]
            path = run_path(runs_dir, job)
            write_json(path.with_suffix(".tmp"), r).replace(path)  # whole files only
        c = r["curves"]
        print(f"[{len(results)}/{len(jobs)}] {r['setting']:<20} {r['arm']:<8} seed {r['seed']}: {r['seconds']:.0f} s "
              f"(eval {r['eval_seconds']:.0f} s, CPU {r['cpu_seconds']:.0f} s); "
              f"final val_loss {c['val_loss'][-1]:.4f}, "
              f"probe {c['probe'][-1]:.3f}, fd {c['fd'][-1]:.2f}", flush=True)

    if workers <= 1:
        for job in todo:
            report(run_job(job), job)
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job): job for job in todo}
        for future in as_completed(futures):
            report(future.result(), futures[future])
    return results


def paired_seeds(settings: list[Setting], results: list[dict[str, Any]], seeds: Sequence[int]) -> dict[str, list[int]]:
    """Per setting, the seeds (in the command's order) whose two arms both finished."""
    have = {(r["setting"], r["arm"], r["seed"]) for r in results}
    return {s.name: [seed for seed in seeds if all((s.name, arm, seed) in have for arm in ARMS)] for s in settings}


def method_costs(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: the span from its first run's start to its last run's end, its runs' summed wall and
    CPU time."""
    out = {}
    for m in sorted({r["method"] for r in results}):
        rs = [r for r in results if r["method"] == m]
        out[m] = {"wall_span_seconds": max(r["finished"] for r in rs) - min(r["started"] for r in rs),
                  "run_seconds": sum(r["seconds"] for r in rs), "cpu_seconds": sum(r["cpu_seconds"] for r in rs),
                  "runs": len(rs)}
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.from_json is not None:
        document = json.loads(args.from_json.read_text())
    else:
        settings = make_settings(args)
        evals = {s.method: evals_for(s.method, args) for s in settings}
        jobs = [Job(s, arm, seed, evals[s.method], tuple(args.override))
                for s in settings for seed in args.seeds for arm in ARMS]
        jobs.sort(key=lambda j: -j.setting.steps * (1.4 if METHODS[j.setting.method].video else 1.0))  # longest first
        print(f"{len(jobs)} runs on {args.workers} worker(s): " + "; ".join(
            f"{s.name} {s.steps} steps, evaluations every {s.eval_every}" for s in settings), flush=True)
        start, started_at = time.perf_counter(), time.time()
        if args.finished_only:
            results, missing = load_finished(jobs, args.runs_dir)
            print(f"{len(results)} finished run(s) in {args.runs_dir}, {len(missing)} not run yet", flush=True)
        else:
            results = run_all(jobs, args.workers, args.runs_dir)
        paired = paired_seeds(settings, results, args.seeds)
        settings = [s for s in settings if len(paired[s.name]) >= 2]
        if not settings:
            raise SystemExit("no setting has 2 seeds with both arms finished yet")
        evals = {m: e for m, e in evals.items() if any(s.method == m for s in settings)}
        reference = {m: run_reference(next(s for s in settings if s.method == m), evals[m]) for m in evals}
        document = {
            "meta": {"seeds": args.seeds, "paired_seeds": {s.name: paired[s.name] for s in settings},
                     "complete": all(paired[s.name] == list(args.seeds) for s in make_settings(args)),
                     "workers": args.workers, "quick": args.quick, "overrides": args.override,
                     "evals": {m: asdict(e) for m, e in evals.items()}, "bootstrap": BOOTSTRAP, "final_of_last": LAST,
                     "fd_frames_per_evaluation": {m: evals[m].fd_samples * r["frames_per_sample"]
                                                  for m, r in reference.items()},
                     "higher_is_better": HIGHER_IS_BETTER, "wall_seconds": time.perf_counter() - start,
                     "runs_reused": sum(r["started"] < started_at for r in results),  # from --runs-dir
                     "cpu_seconds": sum(r["cpu_seconds"] for r in results), "methods": method_costs(results),
                     "parameters": {f"{r['method']}/{r['arm']}": r["parameters"] for r in results},
                     "command": " ".join(["python benchmarks/convergence.py",
                                          *(argv if argv is not None else sys.argv[1:])]), **machine()},
            "reference_probes": reference,
            "settings": {s.name: summarize_setting([r for r in results if r["setting"] == s.name
                                                    and r["seed"] in paired[s.name]], paired[s.name])
                         for s in settings},
        }
    print(format_table(document), flush=True)
    if args.json is not None and args.from_json is None:
        print(f"wrote {write_json(args.json, document)}")
    if args.plot is not None:
        print(f"wrote {plot(document, args.plot)}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(document) + "\n")
        print(f"wrote {args.markdown}")
    return document


if __name__ == "__main__":
    main()
