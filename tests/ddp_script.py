"""Two-process CPU DDP run (gloo) for tests/test_training_state.py; writes one JSON per rank.

Usage: python ddp_script.py OUT_DIR ENCODER_CHECKPOINT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from helpers import Recorder, TinyFlow, loader
from lightning_repa import RepaCallback


class Record(Recorder):
    def __init__(self, repa: RepaCallback, out: Path) -> None:
        super().__init__(repa)
        self.out = out
        self.data = {"ids": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.data["ids"] += batch["ids"].tolist()

    def on_train_end(self, trainer, pl_module):
        self.data.update(
            weights=[s["logged"]["repa/weight"] for s in self.steps],
            local_similarity=[float(r.similarity) for r in self.results if r.measured],
            updates=[s["similarity"] for s in self.steps if s["similarity"] is not None],
            global_step=trainer.global_step, ema=self.repa.cutoff.ema, tripped_at=self.repa.cutoff.tripped_at,
            projector_sum=[float(p.double().sum()) for p in pl_module.repa_projector.parameters()],
        )
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.data))


def main(out: str, checkpoint: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    repa = RepaCallback(family="sd3", block_index=1, lam=1.0, similarity_threshold=-1.0, encoder="dinov2_vits14",
                        encoder_checkpoint=checkpoint, encoder_image_size=56, decoder="pixels")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(find_unused_parameters=False), max_steps=5,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[repa, Record(repa, Path(out))],
    )
    trainer.fit(TinyFlow("sd3", optimizer="adamw"), loader("sd3", n=20))


if __name__ == "__main__":
    main(*sys.argv[1:3])
