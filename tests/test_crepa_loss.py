"""CREPA (SPEC 6.3, 6.5) end to end through `CRepaObjective`, against references written here.

Every expected value is computed independently of the code under test: projections by hand
(`F.layer_norm` + `F.linear` / `F.conv2d` with the module's weights), resampling with
`F.interpolate` directly, and the CREPA score with explicit Python loops over b, t, k and the
tokens n, on plain Python floats. Pure tensor maths on tiny shapes: no Lightning, no models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_repa.losses import crepa_scores
from reference import as_lists, crepa_objective_reference, crepa_reference
from lightning_repa.maths.align import TeacherTokens
from lightning_repa.objectives.crepa import CRepaObjective
from lightning_repa.objectives.projectors import ConvProjector, LinearProjector

HIDDEN, DIM = 8, 5
ATOL = 2e-5


# ----------------------------------------------------------------------------- references


def _seeded_linear(seed: int = 0) -> LinearProjector:
    """A LinearProjector whose LayerNorm affine is not the identity (so skipping it shows)."""
    torch.manual_seed(seed)
    proj = LinearProjector(HIDDEN, DIM)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        proj.body[0].weight.copy_(1.0 + 0.5 * torch.randn(HIDDEN, generator=g))
        proj.body[0].bias.copy_(0.3 * torch.randn(HIDDEN, generator=g))
    return proj


def _project_linear_by_hand(proj: LinearProjector, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm(hidden) -> Linear(hidden, D) with the module's weights, in float64."""
    ln, lin = proj.body[0], proj.body[1]
    y = F.layer_norm(x.double(), (x.shape[-1],), ln.weight.detach().double(), ln.bias.detach().double(), ln.eps)
    return F.linear(y, lin.weight.detach().double(), lin.bias.detach().double())


def _resample_by_hand(x: torch.Tensor, src, dst) -> torch.Tensor:
    """(B, T, sh*sw, D) -> (B, T, dh*dw, D): per (b, t), 2-D bilinear, antialiased when any axis shrinks."""
    (sh, sw), (dh, dw) = src, dst
    if (sh, sw) == (dh, dw):
        return x
    B, T, _, D = x.shape
    out = torch.empty(B, T, dh * dw, D, dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            img = x[b, t].reshape(sh, sw, D).permute(2, 0, 1)[None]  # (1, D, sh, sw)
            r = F.interpolate(img, size=(dh, dw), mode="bilinear", align_corners=False,
                              antialias=(dh < sh or dw < sw))
            out[b, t] = r[0].permute(1, 2, 0).reshape(dh * dw, D)
    return out


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """Same shape, elementwise |got - want| <= atol + rtol*|want| (float64 comparison)."""
    got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    assert bool((err <= bound).all()), f"max abs error {float(err.max())}:\ngot  {got}\nwant {want}"


def _tokens(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check(result, want_loss, want_sim, want_score):
    assert result.loss.shape == () and result.similarity.shape == () and result.terms["score"].shape == ()
    assert float(result.loss.detach()) == pytest.approx(want_loss, abs=ATOL)
    assert float(result.similarity) == pytest.approx(want_sim, abs=ATOL)
    assert -1.0 <= float(result.similarity) <= 1.0
    assert float(result.terms["score"]) == pytest.approx(want_score, abs=ATOL)
    assert float(result.loss.detach()) == pytest.approx(-float(result.terms["score"]), abs=1e-6)
    assert not result.similarity.requires_grad and not result.terms["score"].requires_grad


# ----------------------------------------------------------------------------- 1. loss vs SPEC 6.3


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("normalize_by_frames", [True, False])
@pytest.mark.parametrize("normalize_neighbours", [False, True])
@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("distance", [0, 1, 2, 7])  # 7 > T - 1 = 3: clamps to 3
def test_crepa_objective_loss_matches_spec_loops(distance, cumulative, normalize_neighbours, normalize_by_frames, tau):
    B, T, grid = 2, 4, (3, 2)  # equal student / teacher grids: no resampling
    proj = _seeded_linear()
    student = _tokens(B, T, grid[0] * grid[1], HIDDEN, seed=1)
    teacher = _tokens(B, T, grid[0] * grid[1], DIM, seed=2)
    obj = CRepaObjective(distance=distance, tau=tau, cumulative=cumulative,
                         normalize_neighbours=normalize_neighbours, normalize_by_frames=normalize_by_frames)
    result = obj(student, grid, TeacherTokens(teacher, grid), proj)

    p = _project_linear_by_hand(proj, student)
    want = crepa_objective_reference(p, teacher, distance, tau, cumulative, normalize_neighbours, normalize_by_frames)
    _check(result, *want)
    assert result.loss.requires_grad  # the projector is trained through the loss


@pytest.mark.parametrize("grid_s,grid_t", [
    ((4, 6), (2, 3)),  # shrink both axes: antialiased, 2:1 aspect kept
    ((2, 2), (3, 3)),  # grow: plain bilinear
    ((4, 2), (2, 3)),  # shrink rows, grow columns: antialias on
])
@pytest.mark.parametrize("normalize_neighbours", [False, True])
def test_crepa_objective_loss_with_resampling_to_teacher_grid(grid_s, grid_t, normalize_neighbours):
    B, T = 2, 3
    proj = _seeded_linear(seed=3)
    student = _tokens(B, T, grid_s[0] * grid_s[1], HIDDEN, seed=4)
    teacher = _tokens(B, T, grid_t[0] * grid_t[1], DIM, seed=5)
    obj = CRepaObjective(distance=2, tau=0.5, cumulative=True, normalize_neighbours=normalize_neighbours)
    result = obj(student, grid_s, TeacherTokens(teacher, grid_t), proj)

    p = _resample_by_hand(_project_linear_by_hand(proj, student), grid_s, grid_t)
    want = crepa_objective_reference(p, teacher, 2, 0.5, True, normalize_neighbours, True)
    _check(result, *want)

    # the aligned tokens themselves: (B, T, M, D) on the teacher grid
    p_got, f_got = obj.align(student, grid_s, TeacherTokens(teacher, grid_t), proj)
    assert p_got.shape == (B, T, grid_t[0] * grid_t[1], DIM) and f_got.shape == p_got.shape
    _assert_close(p_got.double(), p, atol=ATOL, rtol=0)


@pytest.mark.parametrize("distance,tau,cumulative,normalize", [
    (1, 1.0, False, True), (2, 0.5, False, True), (2, 2.0, True, True), (3, 1.0, True, False), (5, 0.5, False, True),
])
def test_crepa_scores_per_frame_match_spec_loops(distance, tau, cumulative, normalize):
    # p != f, so cos(p[t], f[t+k]) != cos(p[t+k], f[t]): per-frame scores see a swapped direction
    p, f = _tokens(2, 5, 3, 4, seed=6), _tokens(2, 5, 3, 4, seed=7)
    score, self_sim = crepa_scores(p, f, distance, tau, cumulative, normalize)
    want_score, want_self = crepa_reference(as_lists(p), as_lists(f), distance, tau, cumulative, normalize)
    assert score.shape == (2, 5) and self_sim.shape == (2, 5)
    _assert_close(score.double(), torch.tensor(want_score, dtype=torch.float64), atol=ATOL, rtol=0)
    _assert_close(self_sim.double(), torch.tensor(want_self, dtype=torch.float64), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- 2. hand-made scores


def _unit_frames(vectors, n_tokens=3):
    """(1, T, n_tokens, D): every token of frame t is vectors[t]."""
    v = torch.tensor(vectors, dtype=torch.float64)  # (T, D)
    return v[None, :, None, :].expand(1, v.shape[0], n_tokens, v.shape[1]).clone()


def test_identical_unit_frames_distance_1():
    x = _unit_frames([[0.6, 0.8, 0.0]] * 4)
    e = math.exp(-1.0)
    score, self_sim = crepa_scores(x, x, distance=1, tau=1.0)
    _assert_close(score[0], torch.tensor([1 + e, 1 + 2 * e, 1 + 2 * e, 1 + e], dtype=score.dtype))
    assert float(score.mean()) == pytest.approx(1 + 1.5 * e, abs=1e-9)
    _assert_close(self_sim, torch.ones_like(self_sim))
    # norms of p do not matter (cosine)
    score_scaled, _ = crepa_scores(3.0 * x, x, distance=1, tau=1.0)
    _assert_close(score_scaled, score)
    # normalize_neighbours: each frame divided by 1 + its applied weights -> exactly 1
    normed, _ = crepa_scores(x, x, distance=1, tau=1.0, normalize_neighbours=True)
    _assert_close(normed, torch.ones_like(normed))


def test_identical_unit_frames_through_objective():
    # p == f through the objective: the teacher is the projection (by hand) of the student.
    proj = _seeded_linear(seed=8)
    student = _tokens(1, 1, 1, HIDDEN, seed=9).expand(1, 4, 4, HIDDEN).clone()  # all tokens of all frames equal
    teacher = _project_linear_by_hand(proj, student).float()
    e = math.exp(-1.0)
    res = CRepaObjective(distance=1, tau=1.0)(student, (2, 2), TeacherTokens(teacher, (2, 2)), proj)
    assert float(res.terms["score"]) == pytest.approx(1 + 1.5 * e, abs=ATOL)
    assert float(res.loss.detach()) == pytest.approx(-(1 + 1.5 * e), abs=ATOL)
    assert float(res.similarity) == pytest.approx(1.0, abs=ATOL)
    res_sum = CRepaObjective(distance=1, tau=1.0, normalize_by_frames=False)(student, (2, 2), TeacherTokens(teacher, (2, 2)), proj)
    assert float(res_sum.terms["score"]) == pytest.approx(4 + 6 * e, abs=ATOL)
    res_n = CRepaObjective(distance=1, tau=1.0, normalize_neighbours=True)(student, (2, 2), TeacherTokens(teacher, (2, 2)), proj)
    assert float(res_n.terms["score"]) == pytest.approx(1.0, abs=ATOL)


def test_orthogonal_frames_neighbours_contribute_zero():
    x = _unit_frames([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    e = math.exp(-1.0)
    score, self_sim = crepa_scores(x, x, distance=1, tau=1.0)
    _assert_close(score, torch.ones_like(score))
    _assert_close(self_sim, torch.ones_like(self_sim))
    score, _ = crepa_scores(x, x, distance=3, tau=1.0, cumulative=True)
    _assert_close(score, torch.ones_like(score))
    # the divisor still counts the applied weights
    normed, _ = crepa_scores(x, x, distance=1, tau=1.0, normalize_neighbours=True)
    want = torch.tensor([[1 / (1 + e), 1 / (1 + 2 * e), 1 / (1 + 2 * e), 1 / (1 + e)]], dtype=normed.dtype)
    _assert_close(normed, want)


def _rotating_frames(T=4, step=math.pi / 6):
    """Frame t: every token the unit vector at angle t*step, so cos(frame s, frame t) = cos((s-t)*step)."""
    return _unit_frames([[math.cos(t * step), math.sin(t * step)] for t in range(T)])


def test_cumulative_distance_2_tau_2_closed_form():
    x = _rotating_frames()
    w1, w2 = math.exp(-1 / 2), math.exp(-2 / 2)
    c1, c2 = math.sqrt(3) / 2, 1 / 2  # cos(pi/6), cos(pi/3)
    score, _ = crepa_scores(x, x, distance=2, tau=2.0, cumulative=True)
    edge, inner = 1 + w1 * c1 + w2 * c2, 1 + 2 * w1 * c1 + w2 * c2
    _assert_close(score[0], torch.tensor([edge, inner, inner, edge], dtype=score.dtype))
    # mean over frames: 1 + (3*sqrt(3)/4) e^{-1/2} + e^{-1}/2
    assert float(score.mean()) == pytest.approx(1 + 3 * math.sqrt(3) / 4 * math.exp(-0.5) + math.exp(-1) / 2, abs=1e-9)

    normed, _ = crepa_scores(x, x, distance=2, tau=2.0, cumulative=True, normalize_neighbours=True)
    want = [edge / (1 + w1 + w2), inner / (1 + 2 * w1 + w2), inner / (1 + 2 * w1 + w2), edge / (1 + w1 + w2)]
    _assert_close(normed[0], torch.tensor(want, dtype=normed.dtype))

    # adjacent (K = {2}): every frame of T = 4 has exactly one neighbour at distance 2
    adjacent, _ = crepa_scores(x, x, distance=2, tau=2.0, cumulative=False)
    _assert_close(adjacent, torch.full_like(adjacent, 1 + math.exp(-1) / 2))


def test_neighbour_direction_is_student_t_against_teacher_t_plus_minus_k():
    # p[0] = p[1] = e0, f[0] = e0, f[1] = e1
    p = _unit_frames([[1.0, 0.0], [1.0, 0.0]], n_tokens=1)
    f = _unit_frames([[1.0, 0.0], [0.0, 1.0]], n_tokens=1)
    e = math.exp(-1.0)
    score, self_sim = crepa_scores(p, f, distance=1, tau=1.0)
    # frame 0: cos(p0,f0) + e*cos(p0,f1) = 1 ; frame 1: cos(p1,f1) + e*cos(p1,f0) = e
    _assert_close(self_sim[0], torch.tensor([1.0, 0.0], dtype=self_sim.dtype))
    _assert_close(score[0], torch.tensor([1.0, e], dtype=score.dtype))


# ----------------------------------------------------------------------------- 3. pooling, iREPA, conv


def test_spatial_align_false_pools_one_token_per_frame_on_both_sides():
    B, T, grid_s, grid_t = 2, 3, (4, 4), (3, 3)  # grids differ: pooling, not resampling
    proj = _seeded_linear(seed=10)
    student = _tokens(B, T, 16, HIDDEN, seed=11)
    teacher = _tokens(B, T, 9, DIM, seed=12)
    obj = CRepaObjective(distance=1, tau=0.5, normalize_neighbours=True, spatial_align=False)

    p_got, f_got = obj.align(student, grid_s, TeacherTokens(teacher, grid_t), proj)
    assert p_got.shape == (B, T, 1, DIM) and f_got.shape == (B, T, 1, DIM)

    projected = _project_linear_by_hand(proj, student)  # pooled after projection
    p_ref = torch.zeros(B, T, 1, DIM, dtype=torch.float64)
    f_ref = torch.zeros(B, T, 1, DIM, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for n in range(16):
                p_ref[b, t, 0] += projected[b, t, n] / 16
            for m in range(9):
                f_ref[b, t, 0] += teacher[b, t, m].double() / 9
    _assert_close(p_got.double(), p_ref, atol=ATOL, rtol=0)
    _assert_close(f_got.double(), f_ref, atol=ATOL, rtol=0)

    result = obj(student, grid_s, TeacherTokens(teacher, grid_t), proj)
    _check(result, *crepa_objective_reference(p_ref, f_ref, 1, 0.5, False, True, True))


def _zscore_by_loops(teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per (b, t) and channel c: (f - alpha*mean_n f) / (std_n f + 1e-6), unbiased std over the tokens."""
    t64 = teacher.double()
    B, T, M, D = t64.shape
    out = torch.empty_like(t64)
    for b in range(B):
        for t in range(T):
            for c in range(D):
                col = [float(t64[b, t, n, c]) for n in range(M)]
                mean = sum(col) / M
                std = math.sqrt(sum((v - mean) ** 2 for v in col) / (M - 1))
                for n in range(M):
                    out[b, t, n, c] = (col[n] - alpha * mean) / (std + 1e-6)
    return out


def test_irepa_zscores_the_teacher_per_frame():
    B, T, grid = 2, 3, (2, 3)
    proj = _seeded_linear(seed=13)
    student = _tokens(B, T, 6, HIDDEN, seed=14)
    # frames with very different offsets and scales: a z-score over frames would not match
    scale = torch.tensor([0.5, 3.0, 10.0]).view(1, T, 1, 1)
    shift = torch.tensor([-4.0, 0.0, 7.0]).view(1, T, 1, 1)
    teacher = _tokens(B, T, 6, DIM, seed=15) * scale + shift
    obj = CRepaObjective(distance=1, tau=1.0, cumulative=False, normalize_neighbours=True, irepa_alpha=0.6)

    f_ref = _zscore_by_loops(teacher, 0.6)
    _, f_got = obj.align(student, grid, TeacherTokens(teacher, grid), proj)
    _assert_close(f_got.double(), f_ref, atol=1e-4, rtol=1e-5)

    # changing one teacher frame changes the normalised teacher of that frame only
    teacher2 = teacher.clone()
    teacher2[:, 1] = teacher2[:, 1] * 5.0 + 2.0 + _tokens(B, 6, DIM, seed=16)
    _, f_got2 = obj.align(student, grid, TeacherTokens(teacher2, grid), proj)
    _assert_close(f_got2[:, 0], f_got[:, 0])
    _assert_close(f_got2[:, 2], f_got[:, 2])
    assert not torch.allclose(f_got2[:, 1], f_got[:, 1])

    result = obj(student, grid, TeacherTokens(teacher, grid), proj)
    want = crepa_objective_reference(_project_linear_by_hand(proj, student), f_ref, 1, 1.0, False, True, True)
    _check(result, *want)


def _conv_by_hand(proj: ConvProjector, x: torch.Tensor, grid) -> torch.Tensor:
    """Per (b, t): tokens -> (hidden, H, W) map -> conv2d (same padding) -> tokens, float64."""
    h, w = grid
    conv = proj.body
    weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
    B, T = x.shape[:2]
    out = torch.empty(B, T, h * w, weight.shape[0], dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            img = x[b, t].double().reshape(h, w, -1).permute(2, 0, 1)[None]
            y = F.conv2d(img, weight, bias, padding=weight.shape[-1] // 2)
            out[b, t] = y[0].permute(1, 2, 0).reshape(h * w, -1)
    return out


def test_conv_projector_never_mixes_frames():
    B, T, grid = 2, 4, (3, 4)
    torch.manual_seed(17)
    proj = ConvProjector(HIDDEN, DIM, kernel_size=3)
    student = _tokens(B, T, 12, HIDDEN, seed=18)
    y = proj(student, grid)
    assert y.shape == (B, T, 12, DIM)
    _assert_close(y.double(), _conv_by_hand(proj, student, grid), atol=ATOL, rtol=0)
    for t in range(T):
        changed = student.clone()
        changed[:, t] += _tokens(B, 12, HIDDEN, seed=19 + t)
        y2 = proj(changed, grid)
        for s in range(T):
            if s == t:
                assert not torch.allclose(y2[:, s], y[:, s])
            else:
                _assert_close(y2[:, s], y[:, s], atol=0, rtol=0)


def test_crepa_objective_with_conv_projector_and_irepa():
    B, T, grid_s, grid_t = 1, 3, (4, 4), (2, 2)
    torch.manual_seed(20)
    proj = ConvProjector(HIDDEN, DIM, kernel_size=3)
    student = _tokens(B, T, 16, HIDDEN, seed=21)
    teacher = _tokens(B, T, 4, DIM, seed=22)
    obj = CRepaObjective(distance=1, tau=1.0, cumulative=True, normalize_neighbours=True, irepa_alpha=0.6)
    result = obj(student, grid_s, TeacherTokens(teacher, grid_t), proj)
    p = _resample_by_hand(_conv_by_hand(proj, student, grid_s), grid_s, grid_t)
    _check(result, *crepa_objective_reference(p, _zscore_by_loops(teacher, 0.6), 1, 1.0, True, True, True))


# ----------------------------------------------------------------------------- 4. edge cases


@pytest.mark.parametrize("distance,cumulative,normalize_neighbours", [(0, False, False), (1, False, True), (3, True, True)])
def test_single_frame_clamps_distance_to_zero(distance, cumulative, normalize_neighbours):
    p, f = _tokens(3, 1, 4, DIM, seed=23), _tokens(3, 1, 4, DIM, seed=24)
    score, self_sim = crepa_scores(p, f, distance, 1.0, cumulative, normalize_neighbours)
    _assert_close(score, self_sim)
    _, want_self = crepa_reference(as_lists(p), as_lists(f), 0, 1.0, False, False)
    _assert_close(self_sim.double(), torch.tensor(want_self, dtype=torch.float64), atol=ATOL, rtol=0)

    proj = _seeded_linear(seed=25)
    student = _tokens(3, 1, 4, HIDDEN, seed=26)
    obj = CRepaObjective(distance=distance, cumulative=cumulative, normalize_neighbours=normalize_neighbours)
    result = obj(student, (2, 2), TeacherTokens(f, (2, 2)), proj)
    loss, sim, sc = crepa_objective_reference(_project_linear_by_hand(proj, student), f, 0, 1.0, False, False, True)
    _check(result, loss, sim, sc)
    assert float(result.loss.detach()) == pytest.approx(-float(result.similarity), abs=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, HIDDEN), (2, 3, 4, 4, HIDDEN)])
def test_student_tokens_must_be_4d(shape):
    proj = _seeded_linear()
    teacher = _tokens(2, 3, 4, DIM, seed=27)
    with pytest.raises(ValueError, match=r"\(B, T, N, hidden\)"):
        CRepaObjective()(torch.randn(*shape), (2, 2), TeacherTokens(teacher, (2, 2)), proj)


def test_crepa_scores_rejects_non_video_and_mismatched_tokens():
    with pytest.raises(ValueError, match=r"\(B, T, N, D\)"):
        crepa_scores(torch.randn(2, 4, 3), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="same shape"):
        crepa_scores(torch.randn(2, 4, 3, 5), torch.randn(2, 3, 3, 5))
    # student and teacher with different frame counts through the objective
    with pytest.raises(ValueError, match="same shape"):
        CRepaObjective()(torch.randn(2, 4, 4, HIDDEN), (2, 2), TeacherTokens(torch.randn(2, 3, 4, DIM), (2, 2)), _seeded_linear())
