"""Learning-rate schedules against their closed forms at concrete steps."""

from __future__ import annotations

import math

import pytest

from lipflow.schedules import SCHEDULES, lr_factor


@pytest.mark.parametrize("step", [0, 1, 5, 9])
def test_linear_schedule_is_the_reference_closed_form(step):
    """linear(s, T) = (T − s)/T (Newhouse et al. notebook: lr·(steps − s)/steps): 1 at step 0."""
    total = 10
    assert SCHEDULES.get("linear")(step, total) == pytest.approx((total - step) / total, abs=1e-12)
    assert lr_factor("linear", step, total, 0) == pytest.approx((total - step) / total, abs=1e-12)


def test_linear_schedule_reaches_zero_at_the_last_step():
    assert SCHEDULES.get("linear")(10, 10) == 0.0
    assert SCHEDULES.get("linear")(0, 10) == 1.0


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4, 7])
def test_warmup_trains_the_first_step_at_lr_over_warmup(step):
    """Warmup factor is min(1, (s + 1)/W): the first step (s = 0) trains at lr/W, step W − 1 at lr."""
    warmup = 4
    assert lr_factor("constant", step, 100, warmup) == pytest.approx(min(1.0, (step + 1) / warmup), abs=1e-12)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_the_schedule_runs_after_the_warmup_and_starts_at_the_peak(name):
    """After W warmup steps the schedule runs over the remaining T − W steps from its start, so the
    peak lr (factor 1) is reached at steps W − 1 and W; the warmup multiplied a decay already under
    way (cosine, T 100, W 50: the largest factor was 0.54)."""
    total, warmup = 100, 50
    factors = [lr_factor(name, step, total, warmup) for step in range(total)]
    assert max(factors) == 1.0 and factors[warmup - 1] == 1.0 and factors[warmup] == 1.0
    for step in range(warmup, total):
        assert factors[step] == SCHEDULES.get(name)(step - warmup, total - warmup)
    if name == "linear":
        assert factors[-1] == pytest.approx(1 / (total - warmup), abs=1e-12)  # 0 after the last step
    if name == "cosine":
        assert lr_factor(name, 1 + 4, 8 + 4, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)), abs=1e-12)
