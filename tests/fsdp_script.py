"""Two-process CPU FSDP run (gloo) for tests/test_precision.py; writes one JSON per rank.

Lightning 2.6 refuses `FSDPStrategy` with accelerator="cpu" ("requires a GPU accelerator"), and
torch's FullyShardedDataParallel, given `device_id=None` (what Lightning passes on the CPU),
refuses too ("FSDP needs a non-CPU accelerator device"). `CPUFSDPStrategy` is Lightning's
FSDPStrategy with one change: it hands FSDP `device_id=torch.device("cpu")` (being a subclass,
it also passes Lightning's exact-type check). Everything else (the precision plugin and its FSDP
MixedPrecision, use_orig_params=True, the optimizer setup, the forward redirection that runs
training_step inside FSDP's forward) is Lightning's own. Not a supported configuration: a bench
for what the callback does when FSDP flattens and shards the module it attached its projector to.

WRAP: "root" (one FSDP unit, Lightning's default), "projector" (the projector its own unit),
"projector_fp32" (its own unit, left out of FSDP's low-precision parameters through
MixedPrecision._module_classes_to_ignore).

Usage: python fsdp_script.py OUT_DIR ENCODER_CHECKPOINT PRECISION USE_ORIG_PARAMS(0|1) WRAP
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision
from torch.nn.modules.batchnorm import _BatchNorm

from helpers import TinyFlow, loader
from lightning_repa import RepaCallback
from lightning_repa.objectives.projectors import ConvProjector, LinearProjector, MLPProjector

PROJECTORS = (LinearProjector, MLPProjector, ConvProjector)
LOW = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16-true": torch.float16}


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, wrapping on the CPU (see the module docstring)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict = {"similarity": [], "ids": [], "projector_dtype_in_forward": []}

    def on_fit_start(self, trainer, pl_module):
        projector = pl_module.repa_projector  # the FSDP unit when the projector is wrapped on its own
        self.data["wrapped"] = type(trainer.model).__name__
        with FSDP.summon_full_params(trainer.model, writeback=False):
            self.data["initial"] = {n: p.detach().double().flatten().tolist() for n, p in projector.named_parameters()}
        linear = projector.body[-1]  # inside the unit: input and weight dtypes as the forward sees them
        linear.register_forward_pre_hook(
            lambda m, args: self.data["projector_dtype_in_forward"].append(f"{args[0].dtype}/{m.weight.dtype}"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.data["ids"] += batch["ids"].tolist()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.data["similarity"].append(float(trainer.callback_metrics["repa/similarity"]))

    def on_train_end(self, trainer, pl_module):
        with FSDP.summon_full_params(trainer.model, writeback=False):
            self.data["projector"] = {n: p.detach().double().flatten().tolist()
                                      for n, p in pl_module.repa_projector.named_parameters()}
        self.data["global_step"] = trainer.global_step
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.data))


def main(out: str, checkpoint: str, precision: str, use_orig_params: str, wrap: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting in a collective (its peer died) ignores SIGTERM: dump the stacks and exit
    faulthandler.dump_traceback_later(float(os.environ.get("FSDP_SCRIPT_WATCHDOG", 400)), exit=True)
    faulthandler.register(signal.SIGUSR1)
    L.seed_everything(0)
    repa = RepaCallback(family="sd3", block_index=1, lam=1.0, encoder="dinov2_vits14", encoder_checkpoint=checkpoint,
                        encoder_image_size=56, decoder="pixels")
    kwargs: dict = dict(use_orig_params=use_orig_params == "1")
    if wrap in ("projector", "projector_fp32"):
        kwargs["auto_wrap_policy"] = lambda module, recurse, nonwrapped_numel: recurse or isinstance(module, PROJECTORS)
    if wrap == "projector_fp32":
        low = LOW[precision]
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=low, reduce_dtype=low, buffer_dtype=low,
                                                   _module_classes_to_ignore=(_BatchNorm, *PROJECTORS))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(**kwargs), precision=precision, max_steps=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, callbacks=[repa, Record(Path(out))],
    )
    try:
        trainer.fit(TinyFlow("sd3", optimizer="adamw", lr=1e-2), loader("sd3", n=12))
    except BaseException as error:  # for the test to read
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"error{trainer.global_rank}.txt").write_text(
            f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        raise


if __name__ == "__main__":
    main(*sys.argv[1:6])
