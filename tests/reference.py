"""Reference implementations of the alignment losses, written once from the SPEC's formulas with
explicit Python loops (float64), against which the package's tensor code is tested. They share no
code with the package."""

from __future__ import annotations

import math
from typing import Sequence

import torch

Vectors = Sequence[Sequence[float]]  # N vectors of one frame


def cos(u: Sequence[float], v: Sequence[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / max(math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)), 1e-12)


def token_cosine(p_frame: Vectors, f_frame: Vectors) -> float:
    """mean_n cos(p_n, f_n) over the tokens of one frame (SPEC 6.1)."""
    assert len(p_frame) == len(f_frame)
    return sum(cos(p, f) for p, f in zip(p_frame, f_frame)) / len(p_frame)


def as_lists(x) -> list:
    """A tensor or an array as nested Python lists of floats."""
    return torch.as_tensor(x).detach().double().tolist()


def crepa_reference(p, f, distance: int, tau: float, cumulative: bool, normalize_neighbours: bool):
    """SPEC 6.3 with loops. p, f: [b][t][n][c] (lists, tensors or arrays). Returns (score[b][t], self_sim[b][t])."""
    p, f = as_lists(p), as_lists(f)
    B, T = len(p), len(p[0])
    d = min(distance, T - 1)
    ks = list(range(1, d + 1)) if cumulative else ([d] if d > 0 else [])
    score = [[0.0] * T for _ in range(B)]
    self_sim = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            s = self_sim[b][t] = token_cosine(p[b][t], f[b][t])
            applied = 1.0
            for k in ks:
                w = math.exp(-k / tau)
                if t + k < T:
                    s, applied = s + w * token_cosine(p[b][t], f[b][t + k]), applied + w
                if t - k >= 0:
                    s, applied = s + w * token_cosine(p[b][t], f[b][t - k]), applied + w
            score[b][t] = s / applied if normalize_neighbours else s
    return score, self_sim


def crepa_objective_reference(p, f, distance, tau, cumulative, normalize_neighbours, normalize_by_frames):
    """(loss, mean self_sim, mean per-video score) of SPEC 6.3, the weight left out."""
    score, self_sim = crepa_reference(p, f, distance, tau, cumulative, normalize_neighbours)
    B, T = len(score), len(score[0])
    per_video = [sum(score[b]) / (T if normalize_by_frames else 1) for b in range(B)]
    mean_self = sum(self_sim[b][t] for b in range(B) for t in range(T)) / (B * T)
    mean_video = sum(per_video) / B
    return -mean_video, mean_self, mean_video


def manifold_reference(p, f, scope: str) -> float:
    """SPEC 6.2's manifold term with loops over samples and pairs: token pairs within each sample
    (`tokens`), or sample pairs of flattened normalised tokens (`batch`). p, f: [b][n][c]."""
    p, f = as_lists(p), as_lists(f)

    def unit(v: list) -> list:
        norm = max(math.sqrt(sum(y * y for y in v)), 1e-12)  # once per vector, not once per element
        return [x / norm for x in v]

    dot = lambda u, v: sum(a * b for a, b in zip(u, v))
    if scope == "tokens":
        total, count = 0.0, 0
        for pb, fb in zip(p, f):
            up, uf = [unit(t) for t in pb], [unit(t) for t in fb]
            for i in range(len(pb)):
                for j in range(len(pb)):
                    total, count = total + (dot(up[i], up[j]) - dot(uf[i], uf[j])) ** 2, count + 1
        return total / count
    rows_p = [unit([x for t in pb for x in unit(t)]) for pb in p]
    rows_f = [unit([x for t in fb for x in unit(t)]) for fb in f]
    n = len(rows_p)
    return sum((dot(rows_p[i], rows_p[j]) - dot(rows_f[i], rows_f[j])) ** 2 for i in range(n) for j in range(n)) / n**2
