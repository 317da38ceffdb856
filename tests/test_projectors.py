from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_repa.objectives.projectors import ConvProjector, LinearProjector, MLPProjector, build_projector


def test_linear_projector_is_layernorm_then_linear():
    proj = build_projector("linear", 16, 8)
    x = torch.randn(2, 12, 16)
    ln, lin = proj.body
    want = F.linear(F.layer_norm(x, (16,), ln.weight, ln.bias), lin.weight, lin.bias)
    torch.testing.assert_close(proj(x, (3, 4)), want)


def test_mlp_projector_matches_repa_layout():
    proj = build_projector("mlp", 16, 8, width=32)
    assert isinstance(proj, MLPProjector)
    widths = [(m.in_features, m.out_features) for m in proj.body if isinstance(m, torch.nn.Linear)]
    assert widths == [(16, 32), (32, 32), (32, 8)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in proj.body) == 2


def test_conv_projector_runs_on_the_grid_per_frame():
    proj = build_projector("conv", 6, 4, kernel_size=3)
    x = torch.randn(2, 3, 2 * 5, 6)  # (B, T, N, D) on a 2x5 grid
    out = proj(x, (2, 5))
    frame = x[:, 1].reshape(2, 2, 5, 6).permute(0, 3, 1, 2)
    want = F.conv2d(frame, proj.body.weight, proj.body.bias, padding=1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, 1], want)
    swapped = proj(x, (5, 2))  # the grid matters: same tokens on another grid give other outputs
    assert not torch.allclose(out, swapped)


def test_projectors_run_in_float32_under_autocast():
    for proj in (LinearProjector(8, 4), ConvProjector(8, 4)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = proj(torch.randn(2, 4, 8, dtype=torch.bfloat16), (2, 2))
        assert out.dtype == torch.float32


def test_unknown_projector():
    with pytest.raises(ValueError, match="projector"):
        build_projector("transformer", 8, 4)


def test_projectors_stay_float32_when_the_module_is_cast_to_half():
    """Lightning's bf16-true/16-true call module.to(half) before DDP and the optimizer exist."""
    for proj in (LinearProjector(8, 4), MLPProjector(8, 4, width=16), ConvProjector(8, 4)):
        wrapper = torch.nn.Sequential(proj, torch.nn.Linear(4, 4))
        wrapper.to(torch.bfloat16)
        assert {p.dtype for p in proj.parameters()} == {torch.float32}
        assert wrapper[1].weight.dtype == torch.bfloat16  # everything else does follow
        out = proj(torch.randn(2, 4, 8, dtype=torch.bfloat16), (2, 2))
        assert out.dtype == torch.float32
