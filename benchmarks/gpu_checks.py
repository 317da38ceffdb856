"""Precision and distribution checks that need CUDA: run on a GPU machine, not in the CPU test suite.

    python benchmarks/gpu_checks.py                 # every check; exit status 1 if any FAILs
    python benchmarks/gpu_checks.py --only fsdp     # checks whose name contains "fsdp"

Prints one `PASS|FAIL|SKIP|INFO <check>: <detail>` line per check. The checks:

- bf16-mixed, bf16-true, 16-mixed (Lightning's own CUDA path: torch.amp.GradScaler("cuda")) on one
  GPU: the REPA term reaches backward (projector trains; block 0's gradients differ from a lam=0
  run, proj_out's do not), projector weights and gradients stay float32, `repa/similarity` finite;
  for 16-mixed the projector's gradients are `scale` times too large after backward and, unscaled,
  match a 32-true run.
- FSDP (Lightning's FSDPStrategy, use_orig_params=True, FULL_SHARD) on min(2, #GPUs) ranks:
  32-true with one root unit (Lightning's default); bf16-true and bf16-mixed with the projector as
  its own unit kept out of FSDP's low-precision parameters (`projector_fp32`); bf16-mixed with one
  root unit (INFO: the dtype the projector computes in, FSDP casts the whole FlatParameter).
  Every rank agrees on the logged similarity and on the gathered projector weights, which trained.
- DDP with NCCL on 2 GPUs (SKIP with fewer): ranks agree on similarity and projector weights.

`--accelerator cpu` runs the same code on the CPU (gloo, fp16 through MixedPrecision("16-mixed",
"cpu")), FSDP skipped: a smoke test of this script itself. Needs no network: the DINOv2-S teacher is
random (timm, no weights downloaded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning_utilities.core.apply_func import apply_to_collection  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from lightning_repa import RepaCallback  # noqa: E402
from lightning_repa.objectives import ConvProjector, LinearProjector, MLPProjector  # noqa: E402
from lightning_repa.testing import TinyFlow, tiny_loader  # noqa: E402


PROJECTORS = (LinearProjector, MLPProjector, ConvProjector)  # kept out of FSDP's low-precision parameters
RESULTS: list[tuple[str, str, str]] = []


def report(status: str, name: str, detail: str = "") -> None:
    RESULTS.append((status, name, detail))
    print(f"{status} {name}: {detail}", flush=True)


class DeviceFlow(TinyFlow):
    """TinyFlow whose conditioning (built on the CPU) follows the module to its device."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        make_cond = self.fam.make_cond
        self.fam = _FamilyOnDevice(self.fam, lambda b, seed=0: apply_to_collection(
            make_cond(b, seed=seed), torch.Tensor, lambda t: t.to(self.device)))


class _FamilyOnDevice:
    def __init__(self, fam: Any, make_cond: Callable) -> None:
        self._fam, self.make_cond = fam, make_cond

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fam, name)


def repa_options(checkpoint: str) -> dict:
    return dict(family="sd3", block_index=1, encoder="dinov2_vits14", encoder_checkpoint=checkpoint,
                encoder_image_size=56, decoder="pixels")


def make_teacher_checkpoint(directory: Path) -> str:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    path = directory / "dinov2_vits14_random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


# --- one process -----------------------------------------------------------------------------
def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies (`.float().cpu()` alone would alias float32 CPU gradients that unscale_ changes in place)."""
    return {n: p.grad.detach().float().cpu().clone() for n, p in module.named_parameters() if p.grad is not None}


class Probe(L.Callback):
    """First step's gradients after backward (scaled) and before the optimizer step (unscaled), the
    scale, the projector's dtypes and the similarity logged for each optimizer step."""

    def __init__(self) -> None:
        self.scaled: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.scale: Optional[float] = None
        self.similarity: list[float] = []
        self.dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.repa_projector.state_dict().items()}

    def on_after_backward(self, trainer, pl_module):
        if not self.scaled:
            self.scaled = _grads(pl_module)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.scale = float(scaler.get_scale()) if scaler is not None else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grads:
            self.grads = _grads(pl_module)
        self.dtypes |= {p.dtype for p in pl_module.repa_projector.parameters()}
        self.dtypes |= {p.grad.dtype for p in pl_module.repa_projector.parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, *args):
        if "repa/similarity" in trainer.callback_metrics:
            self.similarity.append(float(trainer.callback_metrics["repa/similarity"]))


def fit_one(accelerator: str, precision: str, checkpoint: str, lam: float = 1.0, steps: int = 2):
    kwargs: dict[str, Any] = {"precision": precision}
    if accelerator == "cpu" and precision == "16-mixed":  # Lightning would swap it for bf16-mixed on the CPU
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    probe, module = Probe(), DeviceFlow("sd3", lr=0.05)
    L.seed_everything(0)
    L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, deterministic="warn",
              callbacks=[RepaCallback(lam=lam, **repa_options(checkpoint)), probe], **kwargs,
              ).fit(module, tiny_loader("sd3"))
    return probe, module


def check_precision(accelerator: str, precision: str, checkpoint: str) -> None:
    aligned, module = fit_one(accelerator, precision, checkpoint)
    plain, _ = fit_one(accelerator, precision, checkpoint, lam=0.0)
    final = {k: v.detach().cpu() for k, v in module.repa_projector.state_dict().items()}
    problems = []
    if len(aligned.similarity) != 2 or not all(math.isfinite(s) for s in aligned.similarity):
        problems.append(f"repa/similarity {aligned.similarity}")
    if aligned.dtypes != {torch.float32} or any(v.dtype != torch.float32 for v in final.values()):
        problems.append(f"projector dtypes {aligned.dtypes}")
    if any(torch.equal(v, aligned.initial[k].cpu()) for k, v in final.items()):
        problems.append("projector did not train")
    if not all(torch.isfinite(g).all() for g in aligned.grads.values()):
        problems.append("non-finite gradients")
    block0 = [n for n in aligned.grads if n.startswith("transformer.transformer_blocks.0.")]
    diff0 = max(float((aligned.grads[n] - plain.grads[n]).abs().max()) for n in block0)
    out = "transformer.proj_out.weight"
    diff_out = float((aligned.grads[out] - plain.grads[out]).abs().max())
    scale_out = float(plain.grads[out].abs().max())
    if not diff0 > 0:
        problems.append("block 0 gradients do not depend on the REPA term")
    if diff_out > 1e-2 * scale_out:
        problems.append(f"proj_out gradients changed by {diff_out:.3g} (of {scale_out:.3g}) with the REPA term")
    if any(n.startswith("repa_projector") for n in plain.grads):
        problems.append("lam=0 gave the projector a gradient")
    detail = f"similarity {[round(s, 4) for s in aligned.similarity]}, block-0 grad change {diff0:.3g}"
    report("FAIL" if problems else "PASS", f"{precision} on 1 {accelerator}", "; ".join(problems) or detail)


def check_fp16_scaler(accelerator: str, checkpoint: str) -> None:
    fp16, _ = fit_one(accelerator, "16-mixed", checkpoint, steps=1)
    fp32, _ = fit_one(accelerator, "32-true", checkpoint, steps=1)
    problems, worst = [], 0.0
    if not fp16.scale or fp16.scale <= 1.0:
        problems.append(f"no GradScaler scale ({fp16.scale})")
    else:
        for name in ("repa_projector.body.1.weight", "repa_projector.body.1.bias", "repa_projector.body.0.weight"):
            unscaled, scaled, reference = fp16.grads[name], fp16.scaled[name], fp32.grads[name]
            if not torch.allclose(scaled, unscaled * fp16.scale, rtol=1e-4, atol=0):
                problems.append(f"{name}: gradient after backward is not scale x the unscaled one (REPA not scaled)")
            err = float((unscaled - reference).abs().max() / reference.abs().max())
            worst = max(worst, err)
            if not err < 1e-2:
                problems.append(f"{name}: unscaled gradient off the 32-true one by {err:.3g} (relative)")
    report("FAIL" if problems else "PASS", f"16-mixed GradScaler on 1 {accelerator}",
           "; ".join(problems) or f"scale {fp16.scale:g}, worst relative error vs 32-true {worst:.2g}")


# --- several processes (Lightning relaunches this script for the other ranks) --------------------
class RankRecord(L.Callback):
    def __init__(self, out: Path, fsdp: bool) -> None:
        self.out, self.fsdp = out, fsdp
        self.data: dict = {"similarity": [], "ids": [], "projector_dtype_in_forward": []}

    def _full(self, trainer):
        if not self.fsdp:
            import contextlib

            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(trainer.model, writeback=False)

    def on_fit_start(self, trainer, pl_module):
        projector = pl_module.repa_projector
        with self._full(trainer):
            self.data["initial"] = {n: p.detach().double().flatten().cpu().tolist()
                                    for n, p in projector.named_parameters()}
        projector.body[-1].register_forward_pre_hook(
            lambda m, args: self.data["projector_dtype_in_forward"].append(f"{args[0].dtype}/{m.weight.dtype}"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.data["ids"] += batch["ids"].tolist()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.data["similarity"].append(float(trainer.callback_metrics["repa/similarity"]))

    def on_train_end(self, trainer, pl_module):
        with self._full(trainer):
            self.data["projector"] = {n: p.detach().double().flatten().cpu().tolist()
                                      for n, p in pl_module.repa_projector.named_parameters()}
        self.data["global_step"] = trainer.global_step
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.data))


def worker(kind: str, out: str, checkpoint: str, precision: str, wrap: str, devices: str, accelerator: str) -> None:
    """One rank of a `kind` ("ddp" or "fsdp") run; writes OUT/rank<k>.json, or OUT/error<k>.txt."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "fsdp":
        from torch.distributed.fsdp import MixedPrecision as FSDPMixedPrecision
        from torch.nn.modules.batchnorm import _BatchNorm

        kwargs: dict[str, Any] = {}
        if wrap == "projector_fp32":
            low = {"32-true": torch.float32, "16-mixed": torch.float16, "16-true": torch.float16}.get(
                precision, torch.bfloat16)
            kwargs["auto_wrap_policy"] = lambda module, recurse, nonwrapped_numel: (
                recurse or isinstance(module, PROJECTORS))
            kwargs["mixed_precision"] = FSDPMixedPrecision(param_dtype=low, reduce_dtype=low, buffer_dtype=low,
                                                           _module_classes_to_ignore=(_BatchNorm, *PROJECTORS))
        strategy = FSDPStrategy(**kwargs)
    else:
        strategy = DDPStrategy(find_unused_parameters=False)
    L.seed_everything(0)
    trainer = L.Trainer(accelerator=accelerator, devices=int(devices), strategy=strategy, precision=precision,
                        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[RepaCallback(lam=1.0, **repa_options(checkpoint)),
                                   RankRecord(out_dir, kind == "fsdp")])
    try:
        trainer.fit(DeviceFlow("sd3", optimizer="adamw", lr=1e-2), tiny_loader("sd3", n=12))
    except BaseException as error:
        (out_dir / f"error{trainer.global_rank}.txt").write_text(
            f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        raise


def run_ranks(kind: str, out: Path, checkpoint: str, precision: str, wrap: str, devices: int, accelerator: str,
              timeout: int = 600) -> tuple[list[dict], str]:
    command = [sys.executable, __file__, "--worker", kind, str(out), checkpoint, precision, wrap, str(devices),
               accelerator]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        log = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        log = f"timed out after {timeout} s"
    errors = "".join(p.read_text().split("\n\n")[0] + "\n" for p in sorted(out.glob("error*.txt")))
    files = [out / f"rank{r}.json" for r in range(devices)]
    ranks = [json.loads(f.read_text()) for f in files if f.exists()]
    return ranks, errors or log


def check_ranks(name: str, ranks: list[dict], errors: str, devices: int, want_fp32: Optional[bool] = True) -> None:
    if len(ranks) != devices:
        report("FAIL", name, f"{len(ranks)} of {devices} ranks finished: {errors.strip()}")
        return
    r0, problems = ranks[0], []
    if any(r["global_step"] != 3 for r in ranks):
        problems.append(f"global steps {[r['global_step'] for r in ranks]}")
    if len(r0["similarity"]) != 3 or not all(math.isfinite(s) for s in r0["similarity"]):
        problems.append(f"similarity {r0['similarity']}")
    if any(r["similarity"] != r0["similarity"] for r in ranks):
        problems.append("ranks log different similarities")
    if any(r["projector"] != r0["projector"] for r in ranks):
        problems.append("ranks end with different projector weights")
    if any(r0["projector"][n] == r0["initial"][n] for n in r0["projector"]):
        problems.append("the projector did not train")
    if devices > 1 and not set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"]):
        problems.append("ranks saw the same samples")
    dtypes = sorted(set(r0["projector_dtype_in_forward"]))
    if want_fp32 and dtypes != ["torch.float32/torch.float32"]:
        problems.append(f"the projector computes in {dtypes} (input/weight), not float32")
    detail = f"similarity {[round(s, 4) for s in r0['similarity']]}, projector forward {dtypes}"
    report("FAIL" if problems else "PASS", name, "; ".join(problems) or detail)
    if want_fp32 is None:
        report("INFO", name + " projector dtype", f"the projector computes in {dtypes} (input/weight)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--only", default="", help="run only the checks whose name contains this")
    args = parser.parse_args()
    acc = args.accelerator
    if acc == "cuda" and not torch.cuda.is_available():
        print("FAIL setup: no CUDA device (this script is for a GPU machine; --accelerator cpu smoke-tests it)")
        return 2
    gpus = torch.cuda.device_count() if acc == "cuda" else 2
    print(f"INFO setup: torch {torch.__version__}, lightning {L.__version__}, accelerator {acc}, devices {gpus}"
          + (f", {torch.cuda.get_device_name(0)}" if acc == "cuda" else ""), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        checkpoint = make_teacher_checkpoint(tmp_path)
        single: list[tuple[str, Callable[[], None]]] = [
            ("bf16-mixed", lambda: check_precision(acc, "bf16-mixed", checkpoint)),
            ("bf16-true", lambda: check_precision(acc, "bf16-true", checkpoint)),
            ("16-mixed", lambda: check_precision(acc, "16-mixed", checkpoint)),
            ("16-mixed scaler", lambda: check_fp16_scaler(acc, checkpoint)),
        ]
        n = min(2, gpus)
        fsdp = [("32-true", "root", True), ("bf16-true", "projector_fp32", True),
                ("bf16-mixed", "projector_fp32", True), ("bf16-mixed", "root", None)]
        for name, check in single:
            if args.only in name:
                try:
                    check()
                except Exception as error:  # one broken check must not hide the others
                    report("FAIL", name, f"{type(error).__name__}: {error}")
        for precision, wrap, fp32 in fsdp:
            name = f"fsdp {precision} {wrap} on {n} {acc}"
            if args.only not in name:
                continue
            if acc != "cuda":
                report("SKIP", name, "Lightning runs FSDPStrategy on CUDA only (tests/fsdp_script.py: a CPU bench)")
                continue
            out = tmp_path / f"fsdp-{precision}-{wrap}"
            ranks, errors = run_ranks("fsdp", out, checkpoint, precision, wrap, n, acc)
            check_ranks(name, ranks, errors, n, fp32)
        name = f"ddp {'nccl' if acc == 'cuda' else 'gloo'} bf16-mixed on 2 {acc}"
        if args.only in name:
            if gpus < 2:
                report("SKIP", name, f"{gpus} GPU(s); needs 2")
            else:
                ranks, errors = run_ranks("ddp", tmp_path / "ddp", checkpoint, "bf16-mixed", "root", 2, acc)
                check_ranks(name, ranks, errors, 2)
    failed = [r for r in RESULTS if r[0] == "FAIL"]
    print(f"{'FAIL' if failed else 'PASS'} summary: {len(RESULTS)} results, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:9])
    else:
        sys.exit(main())
