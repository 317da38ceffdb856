"""WeightSchedule and Cutoff against the SPEC section 7 formulas."""

from __future__ import annotations

import pytest

from lightning_repa.schedule import Cutoff, WeightSchedule


# Hand-computed weights (SPEC 7), lam 1, warm-up 10, decay 50, end 0.2, power 2: warm-up s/10;
# p = (s - 10) / 50; at s = 20, p = 0.2 (cos(0.2 pi) = 0.809017); s = 35, p = 0.5; s >= 60, p = 1.
HAND = {
    "constant": {0: 0.0, 5: 0.5, 10: 1.0, 20: 1.0, 35: 1.0, 60: 1.0, 100: 1.0},
    "linear": {0: 0.0, 5: 0.5, 10: 1.0, 20: 0.84, 35: 0.6, 60: 0.2, 100: 0.2},
    "cosine": {0: 0.0, 5: 0.5, 10: 1.0, 20: 0.2 + 0.8 * 1.809017 / 2, 35: 0.6, 60: 0.2, 100: 0.2},
    "polynomial": {0: 0.0, 5: 0.5, 10: 1.0, 20: 0.712, 35: 0.4, 60: 0.2, 100: 0.2},
}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_schedule_matches_hand_computed_values(kind):
    w = WeightSchedule(kind, lam=1.0, warmup_steps=10, decay_steps=50, lambda_end=0.2, power=2.0)
    for step, want in HAND[kind].items():
        assert w(step) == pytest.approx(want, abs=1e-6), step


@pytest.mark.parametrize("kind, want", [("linear", 0.375), ("cosine", 0.25 * 1.7071068), ("polynomial", 0.375),
                                        ("constant", 0.5)])
def test_schedule_without_warmup_power_one(kind, want):
    """lam 0.5, no warm-up, decay 100, end 0, power 1: at step 25 (p = 1/4), cos(pi/4) = 0.7071068."""
    w = WeightSchedule(kind, lam=0.5, decay_steps=100, power=1.0)
    assert w(0) == 0.5 and w(25) == pytest.approx(want, abs=1e-6)


def test_documented_cosine_example():
    """cosine, warm-up 100, decay 5000, end 0: off from step 5100 on."""
    w = WeightSchedule("cosine", lam=0.5, warmup_steps=100, decay_steps=5000, lambda_end=0.0)
    assert w(0) == 0.0 and w(50) == pytest.approx(0.25) and w(100) == pytest.approx(0.5)
    assert w(2600) == pytest.approx(0.25)  # half-way through the decay
    assert w(5099) > 0.0
    assert all(w(s) == pytest.approx(0.0, abs=1e-15) for s in (5100, 5101, 6000, 10**6))


def test_decay_steps_zero_decays_until_max_steps():
    w = WeightSchedule("linear", lam=1.0, warmup_steps=10, decay_steps=0, max_steps=110)
    assert w(10) == 1.0 and w(60) == pytest.approx(0.5) and w(110) == 0.0
    with pytest.raises(ValueError, match="max_steps is not set"):
        WeightSchedule("cosine", decay_steps=0)
    with pytest.raises(ValueError, match="max_steps is not set"):
        WeightSchedule("cosine", decay_steps=0, max_steps=-1)  # Trainer(max_steps=-1): unlimited
    assert WeightSchedule("constant", decay_steps=0)(10**6) == 0.5  # constant needs no length


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="exponential"), "`schedule` must be one of"),
    (dict(lam=-0.1), "`lam`"),
    (dict(warmup_steps=-1), "`warmup_steps`"),
    (dict(decay_steps=2.5), "`decay_steps`"),
    (dict(power=0.0), "`power`"),
])
def test_schedule_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightSchedule(**kwargs)


def test_explicit_zero_weight_is_zero():
    assert WeightSchedule("constant", lam=0.0)(5) == 0.0


def _ema(values, decay):
    ema = None
    for v in values:
        ema = v if ema is None else decay * ema + (1 - decay) * v
    return ema


def test_cutoff_ema_matches_formula():
    values = [0.1, 0.5, -0.2, 0.9, 0.3]
    c = Cutoff(ema_decay=0.8)
    for s, v in enumerate(values):
        c.update(v, s)
        assert c.ema == pytest.approx(_ema(values[: s + 1], 0.8))
        assert c.is_active(s + 1)  # no threshold: never off


def test_step_cutoff():
    c = Cutoff(cutoff_step=5)
    assert c.is_active(4) and not c.is_active(5) and not c.is_active(100)
    assert Cutoff(cutoff_step=0).is_active(10**9)


def test_permanent_threshold_latches():
    c = Cutoff(threshold=0.5, ema_decay=0.5, mode="permanent")
    for s, v in enumerate([0.2, 0.9, 0.0, 0.0]):  # EMA 0.2, 0.55, 0.275, 0.1375
        c.update(v, s)
    assert c.tripped_at == 1 and not c.is_active(4)


def test_recoverable_threshold_comes_back():
    c = Cutoff(threshold=0.5, ema_decay=0.5, mode="recoverable")
    states = []
    for s, v in enumerate([0.2, 0.9, 0.0, 0.95]):  # EMA 0.2, 0.55, 0.275, 0.6125
        c.update(v, s)
        states.append(c.is_active(s + 1))
    assert states == [True, False, True, False]
    assert c.needs_similarity and not Cutoff(threshold=0.5).needs_similarity


def test_cutoff_state_round_trip():
    a = Cutoff(threshold=0.4, ema_decay=0.7)
    for s, v in enumerate([0.1, 0.8, 0.9]):
        a.update(v, s)
    b = Cutoff(threshold=0.4, ema_decay=0.7)
    b.load_state_dict(a.state_dict())
    assert (b.ema, b.tripped_at, b.is_active(3)) == (a.ema, a.tripped_at, a.is_active(3))
    with pytest.raises(KeyError, match="tripped_at"):
        b.load_state_dict({"ema": 0.1, "below": True})


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="sometimes"), "`threshold_mode`"),
    (dict(threshold=1.5), "`similarity_threshold`"),
    (dict(ema_decay=1.0), "`similarity_ema_decay`"),
    (dict(cutoff_step=-1), "`cutoff_step`"),
])
def test_cutoff_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Cutoff(**kwargs)


def test_cutoff_refuses_similarities_outside_cosine_range():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Cutoff().update(1.5, 0)
    with pytest.raises(ValueError):
        Cutoff().update(float("nan"), 0)
