"""Alignment losses (SPEC section 6): pure tensor maths, no Lightning.

Every function takes projected student tokens `p` and teacher tokens `f` laid out on the
same grid and returns similarities (higher is better); the callback turns them into a loss
with the scheduled weight: `L = -w * similarity (+ manifold terms)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _full(x: Tensor) -> Tensor:
    """At least float32: half-precision tokens are promoted, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_pair(p: Tensor, f: Tensor, name: str) -> None:
    if p.shape != f.shape:
        raise ValueError(f"{name}: student and teacher tokens must have the same shape, got {tuple(p.shape)} and {tuple(f.shape)}")


def token_cosine(p: Tensor, f: Tensor) -> Tensor:
    """Mean over tokens of the cosine similarity of matching tokens.

    `token_cosine(p, f) = mean_n <p_n/|p_n|, f_n/|f_n|>`; inputs (..., N, D), output (...).
    """
    _check_pair(p, f, "token_cosine")
    return F.cosine_similarity(_full(p), _full(f), dim=-1, eps=1e-8).mean(dim=-1)


def manifold_loss(p: Tensor, f: Tensor, scope: str = "tokens") -> Tensor:
    """U-REPA manifold term: mean squared difference of the normalised Gram matrices.

    scope="tokens": per sample, the (N, N) token-pair Gram matrices,
        `M = mean_{b,i,j} (P̂_b P̂_bᵀ - F̂_b F̂_bᵀ)²_ij` with rows of P̂, F̂ normalised.
    scope="batch": the (B, B) sample-pair Gram matrix, each sample's normalised tokens
        flattened to one vector and that vector normalised.
    Inputs (B, N, D); returns a scalar.
    """
    _check_pair(p, f, "manifold_loss")
    if p.dim() != 3:
        raise ValueError(f"manifold_loss expects (B, N, D) tokens, got {tuple(p.shape)}")
    p_hat = F.normalize(_full(p), dim=-1)  # (B, N, D)
    f_hat = F.normalize(_full(f), dim=-1)
    if scope == "tokens":
        gram_p = p_hat @ p_hat.transpose(1, 2)  # (B, N, N)
        gram_f = f_hat @ f_hat.transpose(1, 2)
    elif scope == "batch":
        p_vec = F.normalize(p_hat.flatten(1), dim=-1)  # (B, N*D)
        f_vec = F.normalize(f_hat.flatten(1), dim=-1)
        gram_p = p_vec @ p_vec.T  # (B, B)
        gram_f = f_vec @ f_vec.T
    else:
        raise ValueError(f"`manifold_scope` must be 'tokens' or 'batch', got {scope!r}")
    return (gram_p - gram_f).pow(2).mean()


def crepa_scores(
    p: Tensor,
    f: Tensor,
    distance: int = 1,
    tau: float = 1.0,
    cumulative: bool = False,
    normalize_neighbours: bool = False,
) -> tuple[Tensor, Tensor]:
    """CREPA cross-frame scores.

    Inputs (B, T, N, D). With d = min(distance, T - 1) and w_k = exp(-k / tau):
    `score[b,t] = self_sim[b,t] + sum_{k in K} w_k (cos(p[t], f[t+k])·[t+k<T] + cos(p[t], f[t-k])·[t-k>=0])`,
    K = {d} or {1..d} (cumulative). With `normalize_neighbours` the score is divided by
    1 + the sum of the weights actually applied to that frame. Returns (score, self_sim),
    each (B, T).
    """
    _check_pair(p, f, "crepa_scores")
    if p.dim() != 4:
        raise ValueError(f"crepa_scores expects (B, T, N, D) tokens, got {tuple(p.shape)}")
    if distance < 0 or tau <= 0:
        raise ValueError(f"crepa_scores needs distance >= 0 and tau > 0, got {distance} and {tau}")
    n_frames = p.shape[1]
    p_hat = F.normalize(_full(p), dim=-1)  # (B, T, N, D)
    f_hat = F.normalize(_full(f), dim=-1)
    self_sim = (p_hat * f_hat).sum(-1).mean(-1)  # (B, T)
    score = self_sim.clone()
    applied = torch.ones(n_frames, dtype=score.dtype, device=score.device)  # (T,) weight sum per frame
    d = min(distance, n_frames - 1)
    offsets = range(1, d + 1) if cumulative else ([d] if d > 0 else [])
    for k in offsets:
        w = math.exp(-k / tau)
        forward = (p_hat[:, :-k] * f_hat[:, k:]).sum(-1).mean(-1)  # (B, T-k): frame t vs t+k
        backward = (p_hat[:, k:] * f_hat[:, :-k]).sum(-1).mean(-1)  # (B, T-k): frame t vs t-k
        score[:, :-k] += w * forward
        score[:, k:] += w * backward
        applied[:-k] += w
        applied[k:] += w
    if normalize_neighbours:
        score = score / applied
    return score, self_sim
