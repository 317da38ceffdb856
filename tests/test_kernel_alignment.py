"""Linear CKA and CKNNA (lightning_repa/kernel_alignment.py) against independent numpy loops
written from the papers' formulas, their invariances, and their errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_repa.maths.kernel_alignment import cknna, hsic_unbiased, linear_cka


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: one thread is fastest, and far faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- independent implementations: plain loops over samples --------------------------------------


def _gram(x: np.ndarray) -> list[list[float]]:
    n = len(x)
    return [[float(sum(x[i][d] * x[j][d] for d in range(len(x[i])))) for j in range(n)] for i in range(n)]


def _loop_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019: HSIC(K, L) = Σ_ij (HKH)_ij (HLH)_ij, CKA = HSIC(K,L)/sqrt(HSIC(K,K) HSIC(L,L))."""
    n = len(x)

    def centred(k):
        rows = [sum(k[i]) / n for i in range(n)]
        cols = [sum(k[i][j] for i in range(n)) / n for j in range(n)]
        total = sum(rows) / n
        return [[k[i][j] - rows[i] - cols[j] + total for j in range(n)] for i in range(n)]

    kc, lc = centred(_gram(x)), centred(_gram(y))

    def hsic(a, b):
        return sum(a[i][j] * b[i][j] for i in range(n) for j in range(n))

    return hsic(kc, lc) / math.sqrt(hsic(kc, kc) * hsic(lc, lc))


def _loop_hsic_unbiased(a, b) -> float:
    """Song et al. 2012, eq. 5, with the diagonals zeroed, one sum at a time."""
    n = len(a)
    at = [[0.0 if i == j else a[i][j] for j in range(n)] for i in range(n)]
    bt = [[0.0 if i == j else b[i][j] for j in range(n)] for i in range(n)]
    trace = sum(at[i][j] * bt[j][i] for i in range(n) for j in range(n))  # tr(Ã B̃)
    sum_a = sum(at[i][j] for i in range(n) for j in range(n))
    sum_b = sum(bt[i][j] for i in range(n) for j in range(n))
    cross = sum(at[i][j] * bt[j][m] for i in range(n) for j in range(n) for m in range(n))  # 1ᵀ Ã B̃ 1
    return (trace + sum_a * sum_b / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def _loop_neighbours(k: list[list[float]], topk: int) -> list[set[int]]:
    """For each sample i, the `topk` samples j != i with the largest kernel value k[i][j]."""
    n = len(k)
    return [set(sorted((j for j in range(n) if j != i), key=lambda j: -k[i][j])[:topk]) for i in range(n)]


def _loop_cknna(x: np.ndarray, y: np.ndarray, topk: int) -> float:
    """Huh et al. 2024, eqs. A7-A8: Align(K, L) over the pairs (i, j) with j a neighbour of i in both
    kernels; the centred sum is the unbiased HSIC of the masked kernels (the authors' estimator)."""
    n = len(x)
    k, l = _gram(x), _gram(y)
    nk, nl = _loop_neighbours(k, topk), _loop_neighbours(l, topk)

    def align(a, b, keep):
        masked_a = [[a[i][j] if keep(i, j) else 0.0 for j in range(n)] for i in range(n)]
        masked_b = [[b[i][j] if keep(i, j) else 0.0 for j in range(n)] for i in range(n)]
        return _loop_hsic_unbiased(masked_a, masked_b)

    kl = align(k, l, lambda i, j: j in nk[i] and j in nl[i])
    kk = align(k, k, lambda i, j: j in nk[i])
    ll = align(l, l, lambda i, j: j in nl[i])
    return kl / math.sqrt(kk * ll)


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_features(d, d, seed))
    return q  # (d, d) orthogonal


# --- against the loops -----------------------------------------------------------------------------


@pytest.mark.parametrize("n, dx, dy", [(12, 5, 7), (9, 16, 3)])  # Gram form (N small) and feature form
def test_linear_cka_matches_the_loops(n, dx, dy):
    x, y = _features(n, dx, 1), _features(n, dy, 2)
    y = y + 0.5 * x[:, :1]  # some shared structure
    assert linear_cka(x, y) == pytest.approx(_loop_linear_cka(x.numpy(), y.numpy()), rel=1e-10)
    assert linear_cka(x.float(), y.float()) == pytest.approx(_loop_linear_cka(x.numpy(), y.numpy()), rel=1e-5)


def test_hsic_unbiased_matches_the_loops_for_asymmetric_kernels():
    a, b = _features(8, 8, 3), _features(8, 8, 4)  # masked kernels are not symmetric
    assert float(hsic_unbiased(a, b)) == pytest.approx(_loop_hsic_unbiased(a.tolist(), b.tolist()), rel=1e-10)


@pytest.mark.parametrize("n, topk", [(16, 2), (16, 5), (20, 10), (12, 11)])
def test_cknna_matches_the_loops(n, topk):
    x = _features(n, 6, 5)
    y = x @ _features(6, 9, 6) + 0.7 * _features(n, 9, 7)  # related, not identical
    expected = _loop_cknna(x.numpy(), y.numpy(), topk)
    assert cknna(x, y, topk) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)  # the cosine kernel the probe uses
    assert cknna(xn, yn, topk) == pytest.approx(_loop_cknna(xn.numpy(), yn.numpy(), topk), rel=1e-9, abs=1e-12)


def test_cknna_with_every_neighbour_is_the_unbiased_cka():
    x, y = _features(30, 8, 8), _features(30, 5, 9)
    y = y + x[:, :5]
    assert cknna(x, y, k=29) == pytest.approx(linear_cka(x, y, unbiased=True), rel=1e-10)


# --- invariances ------------------------------------------------------------------------------------


def test_identical_and_rotated_features_score_one():
    x = _features(64, 16, 10)
    rotated = x @ _rotation(16, 11)
    for metric in (linear_cka, lambda a, b: cknna(a, b, 10), lambda a, b: linear_cka(a, b, unbiased=True)):
        assert metric(x, x) == pytest.approx(1.0, abs=1e-9)
        assert metric(x, rotated) == pytest.approx(1.0, abs=1e-9)
    xn = F.normalize(x, dim=-1)  # a rotation keeps the norms: normalised features rotate too
    assert cknna(xn, F.normalize(rotated, dim=-1), 10) == pytest.approx(1.0, abs=1e-9)
    assert cknna(x, x.float(), 10) == pytest.approx(1.0, abs=1e-6)  # float32 input


def test_scaling_and_translation():
    x = _features(64, 16, 12)
    y = x @ _rotation(16, 13)
    assert linear_cka(x, 3.5 * y) == pytest.approx(1.0, abs=1e-9)  # isotropic scaling
    assert linear_cka(x, 3.5 * y + 2.0) == pytest.approx(1.0, abs=1e-9)  # and translation (CKA centres)
    assert cknna(x, 0.01 * y, 10) == pytest.approx(1.0, abs=1e-9)  # neighbours and the ratio are scale-free
    assert cknna(x, y, 10) == pytest.approx(cknna(2.0 * x, 5.0 * y, 10), rel=1e-9)
    assert linear_cka(x, _features(64, 16, 14)) == pytest.approx(linear_cka(_features(64, 16, 14), x), rel=1e-12)


def test_unrelated_features_score_far_below_a_noisy_copy():
    x = _features(200, 32, 15)
    noisy = x + 0.5 * _features(200, 32, 16)
    unrelated = _features(200, 48, 17)
    xn = F.normalize(x, dim=-1)
    noisy_cknna, unrelated_cknna = cknna(xn, F.normalize(noisy, dim=-1), 10), cknna(xn, F.normalize(unrelated, dim=-1), 10)
    assert noisy_cknna > 0.4 and abs(unrelated_cknna) < 0.1 and noisy_cknna > 4 * abs(unrelated_cknna)
    assert cknna(x, noisy, 10) > 0.4 > 0.1 > abs(cknna(x, unrelated, 10))  # unnormalised too
    assert linear_cka(x, noisy) > 0.75 and linear_cka(x, unrelated) < 0.25
    assert linear_cka(x, noisy, unbiased=True) > 0.75 and abs(linear_cka(x, unrelated, unbiased=True)) < 0.05
    # more noise, less alignment
    noisier = x + 1.5 * _features(200, 32, 18)
    assert cknna(xn, F.normalize(noisier, dim=-1), 10) < noisy_cknna
    assert linear_cka(x, noisier) < linear_cka(x, noisy)


# --- shapes and errors --------------------------------------------------------------------------


def test_shapes_and_errors():
    x = _features(10, 4, 19)
    with pytest.raises(ValueError, match=r"features \(N, D\).*pool tokens first"):
        cknna(x.unsqueeze(0), x.unsqueeze(0), 3)
    with pytest.raises(ValueError, match=r"features \(N, D\)"):
        linear_cka(x[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="x has 10 samples and y has 9"):
        linear_cka(x, x[:9])
    with pytest.raises(ValueError, match=r"`k` must be in \[2, N - 1\] = \[2, 9\].*got 10"):
        cknna(x, x, 10)
    with pytest.raises(ValueError, match=r"`k` must be in \[2, N - 1\]"):
        cknna(x, x, 1)
    with pytest.raises(TypeError, match="`k` must be an int"):
        cknna(x, x, 2.5)
    with pytest.raises(ValueError, match="at least 4 samples"):
        cknna(x[:3], x[:3], 2)
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(x[:3], x[:3], unbiased=True)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        cknna(bad, x, 3)
    with pytest.raises(TypeError, match="two tensors"):
        linear_cka(x.numpy(), x)
    assert math.isnan(linear_cka(x, torch.ones(10, 3)))  # a constant side has nothing to align
    assert isinstance(cknna(x, x, 3), float) and isinstance(linear_cka(x, x), float)
    assert linear_cka(x[:2], x[:2] * 2) == pytest.approx(1.0)  # two samples: one direction, aligned
