"""Two-process CPU DDP run (gloo) for tests/test_training_state.py; writes one JSON per rank.

Usage: python ddp_script.py OUT_DIR ENCODER_CHECKPOINT [cutoff|nan|disk]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from torch.utils.data import DataLoader

from helpers import LatentData, Recorder, TinyFlow, loader
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
            local_similarity=[float(r.similarity) for r in self.results if r.measured and not r.skipped],
            skipped=[r.skipped for r in self.results],
            logged_skipped=[s["logged"].get("repa/skipped") for s in self.steps],
            finite=all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()),
            updates=[s["similarity"] for s in self.steps if s["similarity"] is not None],
            global_step=trainer.global_step, ema=self.repa.cutoff.ema, tripped_at=self.repa.cutoff.tripped_at,
            projector_sum=[float(p.double().sum()) for p in pl_module.repa_projector.parameters()],
            misses=getattr(self.repa.teacher, "misses", None), hits=getattr(self.repa.teacher, "hits", None),
        )
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.data))


class _NanOnRank1(torch.utils.data.Dataset):
    """LatentData whose first item fetched on rank 1 (so in its step-0 batch) has a NaN pixel."""

    def __init__(self) -> None:
        self.data, self.corrupted = LatentData("sd3", n=20), False

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[i]
        if torch.distributed.get_rank() == 1 and not self.corrupted:
            self.corrupted = True
            item["pixels"][0, 0, 0] = float("nan")
        return item


def main(out: str, checkpoint: str, mode: str = "cutoff") -> None:
    """mode "cutoff": a similarity cutoff trips during the run; "nan": rank 1's first batch is corrupt;
    "disk": both ranks share a disk teacher cache over 2 shuffled epochs."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    threshold = -1.0 if mode == "cutoff" else None
    cache = dict(cache="disk", cache_dir=str(Path(out) / "cache")) if mode == "disk" else {}
    repa = RepaCallback(family="sd3", block_index=1, lam=1.0, similarity_threshold=threshold, encoder="dinov2_vits14",
                        encoder_checkpoint=checkpoint, encoder_image_size=56, decoder="pixels", **cache)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(find_unused_parameters=False),
        max_steps=10 if mode == "disk" else 5,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, callbacks=[repa, Record(repa, Path(out))],
    )
    data = {"cutoff": loader("sd3", n=20), "nan": DataLoader(_NanOnRank1(), batch_size=2),
            "disk": DataLoader(LatentData("sd3", n=20), batch_size=2, shuffle=True)}[mode]
    trainer.fit(TinyFlow("sd3", optimizer="adamw"), data)


if __name__ == "__main__":
    main(*sys.argv[1:4])
