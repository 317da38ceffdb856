"""Losses against the SPEC formulas, computed independently with numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_repa.losses import crepa_scores, manifold_loss, token_cosine
from reference import crepa_reference


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_token_cosine_matches_formula():
    p, f = _rand(3, 5, 7), _rand(3, 5, 7, seed=1)
    got = token_cosine(p, f)
    want = [np.mean([_cos(p[b, n].numpy(), f[b, n].numpy()) for n in range(5)]) for b in range(3)]
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_token_cosine_is_scale_invariant_and_bounded():
    p = _rand(2, 4, 8)
    torch.testing.assert_close(token_cosine(p, 3.0 * p), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(token_cosine(p, -p), -torch.ones(2, dtype=torch.float64))


def test_token_cosine_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 8\).*\(2, 5, 8\)"):
        token_cosine(_rand(2, 4, 8), _rand(2, 5, 8))


def _normed(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_manifold_tokens_matches_formula():
    p, f = _rand(2, 6, 5).numpy(), _rand(2, 6, 5, seed=1).numpy()
    total = 0.0
    for b in range(2):
        P, F = _normed(p[b]), _normed(f[b])
        for i in range(6):
            for j in range(6):
                total += (P[i] @ P[j] - F[i] @ F[j]) ** 2
    got = manifold_loss(torch.from_numpy(p), torch.from_numpy(f), scope="tokens")
    assert math.isclose(float(got), total / (2 * 36), rel_tol=1e-5)


def test_manifold_batch_matches_formula():
    p, f = _rand(3, 4, 5).numpy(), _rand(3, 4, 5, seed=1).numpy()
    P = _normed(np.stack([_normed(x).ravel() for x in p]))
    F = _normed(np.stack([_normed(x).ravel() for x in f]))
    want = np.mean((P @ P.T - F @ F.T) ** 2)
    got = manifold_loss(torch.from_numpy(p), torch.from_numpy(f), scope="batch")
    assert math.isclose(float(got), float(want), rel_tol=1e-5)


def test_manifold_is_zero_for_identical_and_positive_otherwise():
    p = _rand(2, 6, 5)
    assert float(manifold_loss(p, 2 * p)) < 1e-12
    assert float(manifold_loss(p, _rand(2, 6, 5, seed=3))) > 1e-3
    with pytest.raises(ValueError, match="manifold_scope"):
        manifold_loss(p, p, scope="samples")


@pytest.mark.parametrize("distance,tau,cumulative,normalize", [
    (0, 1.0, False, False), (1, 1.0, False, False), (2, 0.5, False, True), (2, 2.0, True, False),
    (3, 1.0, True, True), (9, 1.0, True, False),  # distance > T - 1 is clamped
])
def test_crepa_scores_match_formula(distance, tau, cumulative, normalize):
    p, f = _rand(2, 4, 3, 5).numpy(), _rand(2, 4, 3, 5, seed=1).numpy()
    score, self_sim = crepa_scores(torch.from_numpy(p), torch.from_numpy(f), distance, tau, cumulative, normalize)
    want_score, want_self = crepa_reference(p, f, distance, tau, cumulative, normalize)
    np.testing.assert_allclose(self_sim.numpy(), want_self, rtol=1e-5)
    np.testing.assert_allclose(score.numpy(), want_score, rtol=1e-5)
