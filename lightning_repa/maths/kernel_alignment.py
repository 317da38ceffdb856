"""Kernel alignment between two sets of features of the same samples: linear CKA and CKNNA.
Pure tensor maths, no Lightning.

Both take features `x` (N, D) and `y` (N, D') of the same N samples in the same order (the
widths may differ) and return a Python float; 1 means the two representations agree up to a
rotation and a scale. They are computed in float64.

Notation: `K = x xᵀ` and `L = y yᵀ` are the (N, N) linear (inner-product) kernels, `H = I - 11ᵀ/N`
the centring matrix, and for a kernel `A`, `Ã` is `A` with its diagonal set to 0.

- **HSIC, biased** (Gretton et al. 2005): `HSIC_b(K, L) = tr(K H L H)` (the usual 1/(N-1)² factor
  cancels in every ratio below).
- **HSIC, unbiased** (Song et al. 2012, "Feature selection via dependence maximization", JMLR 13,
  eq. 5), N >= 4::

      HSIC_u(A, B) = [ tr(Ã B̃) + (1ᵀÃ1)(1ᵀB̃1) / ((N-1)(N-2)) - 2/(N-2) · 1ᵀ Ã B̃ 1 ] / (N(N-3))

- **Linear CKA** (Kornblith et al. 2019, "Similarity of neural network representations
  revisited", ICML): `CKA(x, y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`, which with the
  biased HSIC and centred features `x̄ = x - mean(x)` is
  `‖ȳᵀx̄‖²_F / (‖x̄ᵀx̄‖_F ‖ȳᵀȳ‖_F)`, in [0, 1]. Invariant to orthogonal transforms and isotropic
  scaling of either side, and to translations.
- **CKNNA**, centred kernel nearest-neighbour alignment (Huh, Cheung, Wang and Isola 2024, "The
  Platonic Representation Hypothesis", ICML, appendix A, eqs. A7-A8): CKA restricted to the
  pairs of samples that are nearest neighbours in *both* representations. With `knn_K(i)` the
  k samples j != i with the largest `K_ij` (the same for L),

      α(i, j) = 1[ j ∈ knn_K(i) and j ∈ knn_L(i) ]
      Align(K, L) = Σ_ij α(i, j) K̄_ij L̄_ij           (K̄, L̄: centred kernels)
      CKNNA(K, L) = Align(K, L) / sqrt(Align(K, K) Align(L, L))

  where, as in the authors' reference code (github.com/minyoungg/platonic-rep, `metrics.py`,
  `AlignmentMetrics.cknna` with its default `unbiased=True`), the centred sum is the unbiased
  HSIC of the neighbour-masked kernels: `Align(K, L) = HSIC_u(α∘K, α∘L)`, and in `Align(K, K)`
  the mask is `knn_K` alone. Its trace term `tr(Ã B̃) = Σ_ij α(i,j) α(j,i) K_ij L_ij` keeps the
  pairs that are neighbours of each other both ways. With `k = N - 1` every pair is kept and
  CKNNA is the unbiased linear CKA (`linear_cka(x, y, unbiased=True)`). CKNNA lies in [-1, 1]
  (near 0 for unrelated features) and is invariant to orthogonal transforms and isotropic
  scaling of either side. Huh et al. use k = 10 on L2-normalised features (`F.normalize(x,
  dim=-1)`: the kernel is then the cosine similarity); REPA (Yu et al. 2025, "Representation
  alignment for generation", ICLR) measures it between spatially averaged diffusion-transformer
  tokens and DINOv2 features the same way. The reference divides by `sqrt(...) + 1e-6`; here the
  division is exact, and a self-alignment that is not positive gives NaN (CKNNA undefined).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["KernelAlignment", "cknna", "hsic_unbiased", "linear_cka"]


def _check(x: Tensor, y: Tensor, name: str, min_samples: int) -> tuple[Tensor, Tensor]:
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise TypeError(f"{name} expects two tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"{name} expects features (N, D) and (N, D') of the same N samples, got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}; pool tokens first (e.g. tokens.mean(dim=1))"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: x has {x.shape[0]} samples and y has {y.shape[0]}; both must hold the same samples in the same order"
        )
    if x.shape[0] < min_samples:
        raise ValueError(f"{name} needs at least {min_samples} samples, got {x.shape[0]}")
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"{name}: the features contain NaN or infinite values")
    return x, y


def hsic_unbiased(a: Tensor, b: Tensor) -> Tensor:
    """The unbiased HSIC estimator of Song et al. 2012 (eq. 5) for (N, N) kernels, N >= 4 (see the
    module docstring); the diagonals are ignored. Kernels need not be symmetric. A 0-d tensor."""
    n = a.shape[0]
    if a.shape != (n, n) or b.shape != (n, n):
        raise ValueError(f"hsic_unbiased expects two (N, N) kernels, got {tuple(a.shape)} and {tuple(b.shape)}")
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs N >= 4 samples, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    a, b = a.masked_fill(eye, 0.0), b.masked_fill(eye, 0.0)
    trace = (a * b.T).sum()  # tr(Ã B̃)
    sums = a.sum() * b.sum() / ((n - 1) * (n - 2))  # (1ᵀÃ1)(1ᵀB̃1) / ((N-1)(N-2))
    cross = 2.0 * (a.sum(dim=0) @ b.sum(dim=1)) / (n - 2)  # 2/(N-2) · 1ᵀ Ã B̃ 1
    return (trace + sums - cross) / (n * (n - 3))


def _ratio(num: Tensor, den_a: Tensor, den_b: Tensor) -> float:
    den = float(den_a) * float(den_b)
    if not den > 0.0:
        return math.nan
    return float(num) / math.sqrt(den)


def linear_cka(x: Tensor, y: Tensor, unbiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) between features `x` (N, D) and `y` (N, D'): in [0, 1].

    `unbiased=False` (the usual one): `‖ȳᵀx̄‖²_F / (‖x̄ᵀx̄‖_F ‖ȳᵀȳ‖_F)` with centred features.
    `unbiased=True`: the same ratio of unbiased HSICs (Song et al. 2012) of `K = x xᵀ`,
    `L = y yᵀ` (N >= 4); it can be slightly negative for unrelated features. NaN when one side
    is constant (no variance to align).
    """
    x, y = _check(x, y, "linear_cka", 4 if unbiased else 2)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if unbiased:
        k, l = x @ x.T, y @ y.T
        return _ratio(hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l))
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if n * n * (dx + dy) <= n * (dx + dy) ** 2:  # Gram form: cheaper when N is small
        k, l = x @ x.T, y @ y.T  # already centred: H K H = x̄ x̄ᵀ
        return _ratio((k * l).sum(), (k * k).sum(), (l * l).sum())  # HSIC_b(K, K) = ‖x̄x̄ᵀ‖²_F
    return _ratio((y.T @ x).pow(2).sum(), (x.T @ x).pow(2).sum(), (y.T @ y).pow(2).sum())  # ‖x̄x̄ᵀ‖_F = ‖x̄ᵀx̄‖_F


def _knn_mask(kernel: Tensor, k: int) -> Tensor:
    """(N, N) 0/1 mask: row i marks the k samples j != i with the largest kernel[i, j]."""
    n = kernel.shape[0]
    scores = kernel.clone()
    scores.fill_diagonal_(-math.inf)
    neighbours = scores.topk(k, dim=1).indices  # (N, k)
    return torch.zeros(n, n, dtype=kernel.dtype, device=kernel.device).scatter_(1, neighbours, 1.0)


def cknna(x: Tensor, y: Tensor, k: int = 10) -> float:
    """CKNNA (Huh et al. 2024, eqs. A7-A8; the authors' reference estimator) between features
    `x` (N, D) and `y` (N, D') with `k` nearest neighbours, 2 <= k <= N - 1 (N >= 4).

    `CKNNA = HSIC_u(α∘K, α∘L) / sqrt(HSIC_u(α_K∘K, α_K∘K) HSIC_u(α_L∘L, α_L∘L))` with the
    inner-product kernels `K = x xᵀ`, `L = y yᵀ`, `α = α_K α_L` the neighbour masks (see the module
    docstring). The kernels are not normalised here: pass L2-normalised features for the cosine
    kernel Huh et al. and REPA use (as :func:`lightning_repa.diagnostics.probe.probe` does). In [-1, 1]; NaN
    when a self-alignment is not positive.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"cknna: `k` must be an int, got {k!r}")
    x, y = _check(x, y, "cknna", 4)
    n = x.shape[0]
    if not 2 <= k <= n - 1:
        raise ValueError(f"cknna: `k` must be in [2, N - 1] = [2, {n - 1}] for N = {n} samples, got {k}")
    kx, ky = x @ x.T, y @ y.T
    mask_x, mask_y = _knn_mask(kx, k), _knn_mask(ky, k)
    both = mask_x * mask_y
    return _ratio(
        hsic_unbiased(both * kx, both * ky),
        hsic_unbiased(mask_x * kx, mask_x * kx),
        hsic_unbiased(mask_y * ky, mask_y * ky),
    )


class KernelAlignment(Metric):
    """CKNNA and linear CKA between two representations of the same samples, accumulated over
    batches (torchmetrics: the features of every rank are gathered before `compute`).

    `update(x, y)` takes tokens (B, ..., D) and (B, ..., D') of the same B samples and keeps one
    vector per sample: the mean over its tokens, in float64 (as REPA measures alignment).
    `compute()` returns ``{"cknna": ..., "cka": ...}`` (0-d tensors): CKNNA with
    `k = min(k, N - 1)` neighbours on L2-normalised features (`normalize`, the cosine kernel of
    Huh et al. and REPA) and linear CKA on the raw features. Used by the callback's `repa/cknna`
    and by the probe.

    Example::

        >>> m = KernelAlignment(k=3)
        >>> x = torch.randn(8, 5, 4)
        >>> m.update(x, 2 * x)
        >>> {k: round(float(v), 4) for k, v in m.compute().items()}
        {'cknna': 1.0, 'cka': 1.0}
    """

    full_state_update = False

    def __init__(self, k: int = 10, normalize: bool = True) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"KernelAlignment: CKNNA's `k` must be an int >= 2 (Huh et al. and REPA use 10), got {k!r}")
        self.k, self.normalize = k, normalize
        self.add_state("x", default=[], dist_reduce_fx="cat")
        self.add_state("y", default=[], dist_reduce_fx="cat")

    def update(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"KernelAlignment: {x.shape[0]} and {y.shape[0]} samples; both sides need the same samples")
        self.x.append(_pool(x))  # (B, D)
        self.y.append(_pool(y))  # (B, D')

    @property
    def num_samples(self) -> int:
        return sum(int(x.shape[0]) for x in self.x) if isinstance(self.x, list) else int(self.x.shape[0])

    def compute(self) -> dict[str, Tensor]:
        x, y = dim_zero_cat(self.x), dim_zero_cat(self.y)  # (N, D), (N, D')
        k = min(self.k, x.shape[0] - 1)
        knn = (F.normalize(x, dim=-1), F.normalize(y, dim=-1)) if self.normalize else (x, y)
        return {"cknna": torch.tensor(cknna(*knn, k=k), dtype=torch.float64),
                "cka": torch.tensor(linear_cka(x, y), dtype=torch.float64)}


def _pool(tokens: Tensor) -> Tensor:
    """(B, ..., D) tokens -> (B, D): the mean over each sample's tokens, float64, detached."""
    return tokens.detach().reshape(tokens.shape[0], -1, tokens.shape[-1]).to(torch.float64).mean(dim=1)
