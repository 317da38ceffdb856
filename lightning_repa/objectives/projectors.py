"""Trainable projectors from the denoiser's hidden size to the teacher's (SPEC section 5).

All variants share one signature, `forward(x, hw) -> y` with x (B, N, hidden) row-major on
the grid `hw` and y (B, N, out_dim), so they swap freely. They are float32 for their whole
life, whatever the trainer's precision: built in float32, deaf to `module.to(half dtype)` (as
Lightning's "bf16-true"/"16-true" do to the whole LightningModule, before DDP and the
optimizer are built), and run with autocast off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_repa.maths.align import Grid, map_to_tokens, tokens_to_map


_HALF = (torch.float16, torch.bfloat16)
_F32 = {"dtype": torch.float32}


class _Float32(nn.Module):
    """Keeps its parameters float32 and runs `self.body` in float32 with autocast disabled."""

    body: nn.Module

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = hidden, out_dim

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        def keep_float32(t: Tensor) -> Tensor:
            out = fn(t)
            return t.to(device=out.device) if t.dtype == torch.float32 and out.dtype in _HALF else out

        return super()._apply(keep_float32, recurse)

    def forward(self, x: Tensor, hw: Grid) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._run(x.float(), hw)  # float32 for life (not read from the parameters: FSDP may flatten them)

    def _run(self, x: Tensor, hw: Grid) -> Tensor:
        return self.body(x)


class LinearProjector(_Float32):
    """LayerNorm(hidden) -> Linear(hidden, out_dim): the default."""

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__(hidden, out_dim)
        self.body = nn.Sequential(nn.LayerNorm(hidden, **_F32), nn.Linear(hidden, out_dim, **_F32))


class MLPProjector(_Float32):
    """REPA paper: Linear(h, w) - SiLU - Linear(w, w) - SiLU - Linear(w, out_dim)."""

    def __init__(self, hidden: int, out_dim: int, width: int = 2048) -> None:
        super().__init__(hidden, out_dim)
        self.body = nn.Sequential(
            nn.Linear(hidden, width, **_F32), nn.SiLU(), nn.Linear(width, width, **_F32), nn.SiLU(),
            nn.Linear(width, out_dim, **_F32),
        )


class ConvProjector(_Float32):
    """iREPA: Conv2d(hidden, out_dim, k, same padding) on the token grid, per frame."""

    def __init__(self, hidden: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__(hidden, out_dim)
        self.body = nn.Conv2d(hidden, out_dim, kernel_size, padding=kernel_size // 2, **_F32)

    def _run(self, x: Tensor, hw: Grid) -> Tensor:
        lead = x.shape[:-2]
        flat = x.reshape(-1, *x.shape[-2:])  # (B*T, N, hidden)
        y = map_to_tokens(self.body(tokens_to_map(flat, hw)))  # (B*T, N, out_dim)
        return y.reshape(*lead, *y.shape[-2:])


class IdentityProjector(_Float32):
    """No projection (LayerSync: a block aligned with a deeper block of the same width); float32."""

    def __init__(self, hidden: int, out_dim: int) -> None:
        if hidden != out_dim:
            raise ValueError(
                f"`projector=identity` needs the teacher's width to equal the student's, got {hidden} -> {out_dim}; "
                "use it with teacher=backbone (LayerSync), or a linear/mlp projector"
            )
        super().__init__(hidden, out_dim)

    def forward(self, x: Tensor, hw: Grid) -> Tensor:
        return x.float()


def build_projector(kind: str, hidden: int, out_dim: int, width: int = 2048, kernel_size: int = 3) -> nn.Module:
    """The projector named by the `projector` option: linear | mlp | conv | identity."""
    kind = getattr(kind, "value", kind)
    if kind == "identity":
        return IdentityProjector(hidden, out_dim)
    if kind == "linear":
        return LinearProjector(hidden, out_dim)
    if kind == "mlp":
        return MLPProjector(hidden, out_dim, width)
    if kind == "conv":
        return ConvProjector(hidden, out_dim, kernel_size)
    raise ValueError(f"`projector` must be 'linear', 'mlp', 'conv' or 'identity', got {kind!r}")
