"""The DVAR stopping rule on synthetic validation-loss curves: it stops on a plateau, never on a descent."""

from __future__ import annotations

import math
import random

import pytest

from ti_trainer.analysis.early_stopping import (
    StoppingRule,
    check,
    first_plateau,
    still_falling,
    variance_ratio,
)
from ti_trainer.config import TrainConfig
from ti_trainer.errors import UserError

RULE = StoppingRule(window_steps=200, threshold=0.15, every_steps=10)  # 20 evaluations per window


def curve(kind: str, points: int = 150, seed: int = 0) -> tuple[list[int], list[float]]:
    """Validation losses every 10 steps: a fast descent that levels off, or a steady descent, with wiggles."""
    rng = random.Random(seed)
    steps = [10 * i for i in range(points)]
    if kind == "plateau":
        values = [0.30 + 0.10 * math.exp(-i / 12) + rng.gauss(0, 0.0015) for i in range(points)]
    elif kind == "descent":
        values = [0.40 - 0.0008 * i + rng.gauss(0, 0.0015) for i in range(points)]
    else:
        raise ValueError(kind)
    return steps, values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stops_on_a_plateau_soon_after_the_loss_levels_off(seed):
    steps, values = curve("plateau", seed=seed)
    stop = first_plateau(steps, values, RULE)
    assert stop is not None
    # The descent is over by ~5 time constants (evaluation 60, step 600); the rule needs a level window after.
    assert 300 <= stop <= 1000, stop
    assert check(values[: stop // 10 + 1], RULE).plateau


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_stops_a_steady_descent(seed):
    steps, values = curve("descent", points=400, seed=seed)  # 20 windows long: plain DVAR would stop it
    assert first_plateau(steps, values, RULE) is None
    ratio = check(values, RULE).ratio
    assert ratio is not None and ratio < RULE.threshold, "the guard, not the ratio, must be what holds it"


def test_plain_dvar_ratio_is_small_on_a_long_line_which_is_why_the_guard_exists():
    line = [1.0 - 0.01 * i for i in range(100)]
    assert variance_ratio(line, 20) == pytest.approx((20 / 100) ** 2, rel=0.05)
    assert still_falling(line, 20)


def test_no_verdict_until_the_history_is_longer_than_the_window():
    steps, values = curve("plateau", points=RULE.window_points)
    assert check(values, RULE).ratio is None
    assert first_plateau(steps, values, RULE) is None


def test_a_perfectly_flat_loss_is_a_plateau():
    assert check([0.25] * 30, StoppingRule(50, 0.15, 10)).plateau


def test_a_lower_threshold_waits_longer():
    steps, values = curve("plateau", points=300)
    lenient = first_plateau(steps, values, StoppingRule(200, 0.3, 10))
    strict = first_plateau(steps, values, StoppingRule(200, 0.05, 10))
    assert lenient is not None and strict is not None and lenient <= strict


def test_window_is_counted_in_evaluations():
    assert StoppingRule(200, 0.15, 10).window_points == 20
    assert StoppingRule(20, 0.15, 10).window_points == 5  # never fewer than 5 points for a variance


def test_config_checks_the_early_stopping_settings():
    with pytest.raises(UserError, match="threshold"):
        TrainConfig(early_stop_threshold=1.5).validate()
    with pytest.raises(UserError, match="window"):
        TrainConfig(early_stop_window=0).validate()
    defaults = TrainConfig()
    # Validation at the copies' cadence: each point of the curve is a step with a copy (analysis/monitors.py).
    assert defaults.early_stopping and defaults.validate_every == defaults.save_every == 50
