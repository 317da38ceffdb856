"""Pretrain the demo's ViT teacher on the digits' training split and save it as safetensors.

    python -m lightning_repa.demo.pretrain_teacher --out lightning_repa/demo/weights/vit_tiny_digits.safetensors

Plain supervised classification (cross-entropy with label smoothing, AdamW, cosine schedule) with
light augmentation: small random rotations, scalings and shifts. The held-out split is the
``DigitsDataModule`` validation split of the same ``split_seed``; it is never used for model selection,
only measured at the end. The file keeps the classifier head (``head.weight``, ``head.bias``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from lightning_repa.demo.data import load_digit_images, split_indices
from lightning_repa.demo.teacher import TEACHER_NAME, normalize_for_teacher, teacher_checkpoint_path


def augment(x: torch.Tensor, gen: torch.Generator, max_deg: float = 10.0, max_shift: float = 1.5) -> torch.Tensor:
    """Random rotation (±max_deg), scale (0.9–1.1) and shift (±max_shift pixels) of (B, 1, S, S)."""
    b, _, s, _ = x.shape
    u = torch.rand(b, 4, generator=gen) * 2 - 1
    ang = u[:, 0] * math.radians(max_deg)
    scale = 1.0 + 0.1 * u[:, 1]
    shift = u[:, 2:] * (2.0 * max_shift / s)  # affine_grid works in [-1, 1] units
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of the model's classifier on (N, 1, S, S) images in [0, 1]."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(normalize_for_teacher(images[i : i + batch_size]))
        correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum().item()
    return correct / max(len(labels), 1)


def train(epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int, val_fraction: float,
          log_every: int = 10) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    images, labels = load_digit_images(16)
    train_idx, val_idx = split_indices(len(labels), val_fraction, seed)
    x_tr, y_tr, x_va, y_va = images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
    model = timm.create_model(TEACHER_NAME, pretrained=False, num_classes=10)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(y_tr) / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch * 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    )
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            logits = model(normalize_for_teacher(augment(x_tr[idx], gen)))
            loss = F.cross_entropy(logits, y_tr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % log_every == 0 or epoch + 1 == epochs:
            print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  train acc {accuracy(model, x_tr, y_tr):.4f}"
                  f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    info = dict(
        seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        val_fraction=val_fraction, n_train=len(y_tr), n_val=len(y_va), params=n_params,
        train_seconds=round(seconds, 1), torch_threads=torch.get_num_threads(),
        train_accuracy=accuracy(model, x_tr, y_tr), val_accuracy=accuracy(model, x_va, y_va),
    )
    return model.eval(), info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=teacher_checkpoint_path())
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    model, info = train(args.epochs, args.batch_size, args.lr, args.weight_decay, args.seed, args.val_fraction)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    # One metadata key (safetensors writes several in random order) and no timing in it, so the
    # same command on the same torch build writes the same bytes.
    meta = {"model": TEACHER_NAME, **{k: v for k, v in info.items() if k != "train_seconds"}}
    save_file(state, str(args.out), metadata={"lightning_repa": json.dumps(meta, sort_keys=True)})
    info["file_bytes"] = args.out.stat().st_size
    info["sha256"] = hashlib.sha256(args.out.read_bytes()).hexdigest()
    for k, v in info.items():
        print(f"{k}: {v}")
    print(f"saved {args.out}")
    return info


if __name__ == "__main__":
    main()
