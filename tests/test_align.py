"""Token resampling keeps 2-D geometry (SPEC 5, defect 12.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_repa.align import map_to_tokens, pool_tokens, resample_tokens, tokens_to_map


def _coords(h: int, w: int) -> torch.Tensor:
    """Tokens whose 2 channels are their own (row, col) centre in [0, 1]: (1, h*w, 2)."""
    rows = (torch.arange(h) + 0.5) / h
    cols = (torch.arange(w) + 0.5) / w
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1)  # (h, w, 2)
    return grid.reshape(1, h * w, 2)


@pytest.mark.parametrize("src,dst", [((4, 8), (8, 16)), ((8, 16), (4, 8)), ((4, 8), (3, 7)), ((6, 3), (12, 6))])
def test_non_square_geometry_is_kept(src, dst):
    """A token's (row, col) content lands where the same (row, col) sits on the new grid."""
    out = resample_tokens(_coords(*src), src, dst)
    assert out.shape == (1, dst[0] * dst[1], 2)
    grid = out.reshape(*dst, 2)
    # rows vary only along the row axis and columns only along the column axis: no raster wrap
    assert torch.allclose(grid[..., 0], grid[:, :1, 0].expand(-1, dst[1]), atol=1e-6)
    assert torch.allclose(grid[..., 1], grid[:1, :, 1].expand(dst[0], -1), atol=1e-6)
    want = _coords(*dst).reshape(*dst, 2)
    inner = (slice(1, -1), slice(1, -1))  # bilinear is exact for a linear ramp away from the border
    if dst[0] > 2 and dst[1] > 2:
        torch.testing.assert_close(grid[inner], want[inner], atol=0.02, rtol=0)


def test_matches_2d_interpolation_and_differs_from_raster_1d():
    x = torch.randn(2, 4 * 8, 5)
    out = resample_tokens(x, (4, 8), (8, 16))
    ref = F.interpolate(x.reshape(2, 4, 8, 5).permute(0, 3, 1, 2), size=(8, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1).reshape(2, 128, 5))
    raster = F.interpolate(x.transpose(1, 2), size=128, mode="linear").transpose(1, 2)  # the reference's defect
    assert not torch.allclose(out, raster, atol=1e-2)


def test_shrinking_is_antialiased():
    x = torch.randn(1, 16 * 16, 3)
    out = resample_tokens(x, (16, 16), (4, 4))
    ref = F.interpolate(x.reshape(1, 16, 16, 3).permute(0, 3, 1, 2), size=(4, 4), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1).reshape(1, 16, 3))
    # antialiased 4x shrink == 4x4 average pooling up to the filter's tails: much closer than plain bilinear
    pooled = F.avg_pool2d(x.reshape(1, 16, 16, 3).permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1).reshape(1, 16, 3)
    plain = F.interpolate(x.reshape(1, 16, 16, 3).permute(0, 3, 1, 2), size=(4, 4), mode="bilinear")
    plain = plain.permute(0, 2, 3, 1).reshape(1, 16, 3)
    assert (out - pooled).abs().mean() < (plain - pooled).abs().mean()


def test_identity_leading_dims_and_errors():
    x = torch.randn(2, 3, 12, 4)  # (B, T, N, D): frames resampled independently
    assert resample_tokens(x, (3, 4), (3, 4)) is x
    out = resample_tokens(x, (3, 4), (6, 8))
    torch.testing.assert_close(out[:, 1], resample_tokens(x[:, 1], (3, 4), (6, 8)))
    with pytest.raises(ValueError, match="do not fill"):
        resample_tokens(x, (3, 5), (6, 8))
    assert pool_tokens(x).shape == (2, 3, 1, 4)
    torch.testing.assert_close(map_to_tokens(tokens_to_map(x[:, 0], (3, 4))), x[:, 0])
