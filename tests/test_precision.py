"""Precision and distribution: the REPA term under bf16-mixed, bf16-true and fp16 AMP with a
GradScaler on the CPU, and FSDP on two CPU ranks (a bench: Lightning only runs FSDP on CUDA).

What Lightning 2.6 does on the CPU: "bf16-mixed" and "bf16-true" run; "16-mixed" is not refused
but swapped for "bf16-mixed" with a warning, so the fp16 + GradScaler path is reached through
`plugins=[MixedPrecision("16-mixed", "cpu")]` (torch.amp.GradScaler("cpu")); `FSDPStrategy` with
accelerator="cpu" is refused. The GPU side is `benchmarks/gpu_checks.py`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy

from helpers import TinyFlow, loader, trainer
from lightning_repa import RepaCallback

HERE = Path(__file__).resolve().parent
FP16_SCALER = "16-mixed+GradScaler"  # fp16 autocast on the CPU with torch.amp.GradScaler("cpu")


class _Probe(L.Callback):
    """First step's gradients before unscaling (on_after_backward) and as the optimizer sees them
    (on_before_optimizer_step, after the GradScaler's unscale_), the scale, projector dtypes and
    the similarity logged for each optimizer step."""

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
            self.scaled = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.scale = float(scaler.get_scale()) if scaler is not None else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.dtypes |= {p.dtype for p in pl_module.repa_projector.parameters()}
        self.dtypes |= {p.grad.dtype for p in pl_module.repa_projector.parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, *args):
        if "repa/similarity" in trainer.callback_metrics:
            self.similarity.append(float(trainer.callback_metrics["repa/similarity"]))


def _fit(precision: str, repa_options: dict, lam: float = 1.0, steps: int = 2) -> tuple[_Probe, TinyFlow]:
    kwargs: dict[str, Any] = {}
    if precision == FP16_SCALER:
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    else:
        kwargs["precision"] = precision
    probe = _Probe()
    module = TinyFlow("sd3", lr=0.05)
    L.seed_everything(0)
    trainer(steps, [RepaCallback(family="sd3", block_index=1, lam=lam, **repa_options), probe], **kwargs).fit(
        module, loader("sd3"))
    return probe, module


def test_16_mixed_on_cpu_is_swapped_for_bf16_mixed_by_lightning():
    """Not a refusal: Lightning's accelerator connector warns and runs bf16-mixed, without a scaler."""
    with pytest.warns(UserWarning, match=r"AMP with fp16 is not supported on CPU. Using `precision='bf16-mixed'`"):
        t = trainer(1, precision="16-mixed")
    assert isinstance(t.precision_plugin, MixedPrecision)
    assert t.precision_plugin.precision == "bf16-mixed" and t.precision_plugin.scaler is None
    fp16 = trainer(1, plugins=[MixedPrecision("16-mixed", "cpu")]).precision_plugin  # the path the tests use
    assert fp16.precision == "16-mixed" and isinstance(fp16.scaler, torch.amp.GradScaler)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", FP16_SCALER])
def test_aux_loss_reaches_backward_and_the_projector_stays_float32(precision, repa_options):
    aligned, module = _fit(precision, repa_options, lam=1.0)
    plain, _ = _fit(precision, repa_options, lam=0.0)

    assert aligned.similarity and len(aligned.similarity) == 2, "repa/similarity logged once per optimizer step"
    assert all(math.isfinite(s) for s in aligned.similarity)
    assert aligned.dtypes == {torch.float32}, "projector weights and gradients stay float32"
    final = module.repa_projector.state_dict()
    assert all(v.dtype == torch.float32 for v in final.values())
    assert all(not torch.equal(v, aligned.initial[k]) for k, v in final.items()), "the projector trains"
    for name, g in aligned.grads.items():
        assert torch.isfinite(g.float()).all(), name
    # The aux loss reaches the denoiser up to the aligned block (1), not past it.
    before = [n for n in aligned.grads if n.startswith("transformer.transformer_blocks.0.")]
    assert before and any(not torch.equal(aligned.grads[n], plain.grads[n]) for n in before)
    torch.testing.assert_close(aligned.grads["transformer.proj_out.weight"], plain.grads["transformer.proj_out.weight"],
                               rtol=0, atol=0)
    assert not any(n.startswith("repa_projector") for n in plain.grads), "lam=0: the projector gets no gradient"


def test_fp16_grad_scaler_scales_the_aux_term_with_the_loss(repa_options):
    """The REPA term is part of the loss the precision plugin scales: the projector's gradients
    (which only the REPA term produces) are `scale` times too large after backward and, once
    unscaled, match a float32 run."""
    fp16, _ = _fit(FP16_SCALER, repa_options, steps=1)
    fp32, _ = _fit("32-true", repa_options, steps=1)
    assert fp16.scale is not None and fp16.scale > 1.0
    for name in ("repa_projector.body.1.weight", "repa_projector.body.1.bias", "repa_projector.body.0.weight"):
        unscaled, scaled, reference = fp16.grads[name], fp16.scaled[name], fp32.grads[name]
        assert unscaled.abs().sum() > 0, name
        torch.testing.assert_close(scaled, unscaled * fp16.scale, rtol=1e-5, atol=0, msg=name)
        torch.testing.assert_close(unscaled, reference, rtol=1e-2, atol=1e-2 * float(reference.abs().max()), msg=name)


def test_a_projector_whose_parameters_were_replaced_by_tensors_trains_or_fails_loudly(repa_options):
    """FSDP with use_orig_params=False turns the wrapped modules' nn.Parameters into plain tensors
    (views of its FlatParameter). The run must train, or fail with an error; it must not end with
    zero optimizer steps (a StopIteration escaping training_step reads to Lightning as the end of
    the epoch)."""

    class LikeFSDPWithoutOrigParams(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            for m in pl_module.repa_projector.modules():
                for name, p in list(m._parameters.items()):
                    del m._parameters[name]
                    setattr(m, name, p.detach())

    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    t = trainer(2, [repa, LikeFSDPWithoutOrigParams()], max_epochs=3)
    try:
        t.fit(TinyFlow("sd3"), loader("sd3"))
    except (RuntimeError, ValueError) as error:
        assert "projector" in str(error)
    else:
        assert t.global_step == 2, f"fit ended after {t.current_epoch} epochs with {t.global_step} optimizer steps"


# --- FSDP ---------------------------------------------------------------------------------


def test_lightning_refuses_fsdp_on_cpu():
    with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(), logger=False)


def _fsdp(tmp_path: Path, checkpoint: str, precision: str, use_orig_params: int, wrap: str) -> tuple[int, str, list]:
    """Runs tests/fsdp_script.py (2 gloo ranks); a hung rank is killed with its process group."""
    out = tmp_path / f"{precision}-{use_orig_params}-{wrap}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "FSDP_SCRIPT_WATCHDOG": "240"}
    proc = subprocess.Popen([sys.executable, str(HERE / "fsdp_script.py"), str(out), checkpoint, precision,
                             str(use_orig_params), wrap], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    errors = "".join(p.read_text() for p in sorted(out.glob("error*.txt")))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1) if (out / f"rank{r}.json").exists()]
    return proc.returncode, errors or log[-4000:], ranks


@pytest.mark.slow
@pytest.mark.parametrize("precision,wrap", [("32-true", "root"), ("bf16-true", "projector_fp32")])
def test_fsdp_two_cpu_ranks_agree(tmp_path, dinov2_checkpoint, precision, wrap):
    """Lightning's FSDPStrategy (use_orig_params=True, FULL_SHARD), wrapping on the CPU. "root": one
    FSDP unit for the whole module, Lightning's default; "projector_fp32": the projector its own
    unit, left out of FSDP's low-precision parameters (needed with bf16-true, see below)."""
    rc, errors, ranks = _fsdp(tmp_path, dinov2_checkpoint, precision, 1, wrap)
    assert rc == 0 and len(ranks) == 2, errors
    assert set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"]), "ranks must see different data"
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 3
    assert ranks[0]["wrapped"] == "FullyShardedDataParallel"
    assert len(ranks[0]["similarity"]) == 3 and all(math.isfinite(s) for s in ranks[0]["similarity"])
    assert ranks[0]["similarity"] == ranks[1]["similarity"], "the logged similarity is the mean over ranks"
    assert ranks[0]["projector"] == ranks[1]["projector"], "gathered projector weights agree"
    assert all(ranks[0]["projector"][n] != ranks[0]["initial"][n] for n in ranks[0]["projector"]), "it trains"
    assert set(ranks[0]["projector_dtype_in_forward"]) == {"torch.float32/torch.float32"}


@pytest.mark.slow
def test_fsdp_bf16_true_with_the_projector_in_the_root_unit_is_refused_by_fsdp(tmp_path, dinov2_checkpoint):
    """A documented limitation: a FlatParameter holds one dtype, and the projector stays float32 in a
    bf16 module. The fix on the user's side is `projector_fp32` above (its own FSDP unit)."""
    rc, errors, _ = _fsdp(tmp_path, dinov2_checkpoint, "bf16-true", 1, "root")
    assert rc != 0
    assert "Must flatten tensors with uniform dtype but got torch.bfloat16 and torch.float32" in errors
