"""Step time and peak memory of REPA on tiny diffusers denoisers, with and without the callback.

Prints a table and writes JSON (default: benchmarks/results/step_overhead.json).

    python benchmarks/step_overhead.py --families flux sd3 pixart --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import lightning as L
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import TinyFlow, loader  # noqa: E402

from lightning_repa import FAMILIES, RepaCallback  # noqa: E402


class StepTimer(L.Callback):
    def __init__(self, skip: int = 2) -> None:
        self.skip, self.times, self._t0 = skip, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._t0)


def _fit(family: str, steps: int, callbacks: list, batch_size: int) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks + [timer])
    trainer.fit(TinyFlow(family), loader(family, n=steps * batch_size, batch_size=batch_size))
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=sorted(FAMILIES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--encoder-image-size", type=int, default=112)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_overhead.json")
    args = parser.parse_args()

    ckpt = Path("/tmp/lightning_repa_bench_vits14.pth")
    if not ckpt.exists():
        torch.save(timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=518).state_dict(), ckpt)
    rows = []
    for family in args.families:
        base = _fit(family, args.steps, [], args.batch_size)
        repa = RepaCallback(family=family, block_index=1, encoder="dinov2_vits14", encoder_checkpoint=str(ckpt),
                            encoder_image_size=args.encoder_image_size, decoder="pixels")
        with_repa = _fit(family, args.steps, [repa], args.batch_size)
        median = lambda xs: sorted(xs)[len(xs) // 2] * 1e3
        rows.append({"family": family, "base_ms": median(base), "repa_ms": median(with_repa),
                     "overhead_ms": median(with_repa) - median(base)})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'family':<10} {'base ms':>9} {'repa ms':>9} {'overhead':>9}")
    for r in rows:
        print(f"{r['family']:<10} {r['base_ms']:>9.1f} {r['repa_ms']:>9.1f} {r['overhead_ms']:>9.1f}")
    print(f"peak RSS {peak_mb:.0f} MB; batch {args.batch_size}, ViT-S/14 teacher at {args.encoder_image_size} px")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "batch_size": args.batch_size, "steps": args.steps, "encoder_image_size": args.encoder_image_size,
            "peak_rss_mb": peak_mb}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
