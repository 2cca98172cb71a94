"""The step-tax summary (``benchmarks/step_tax.py``): one slow window moves neither side.

No Ray, no timing: synthetic step times in seconds."""

from __future__ import annotations

import numpy as np
import pytest

step_tax = pytest.importorskip("benchmarks.step_tax")


def _window(ms: float, n: int = 80) -> np.ndarray:
    return np.full(n, ms / 1e3) + np.linspace(0, 1e-5, n)


def test_a_slow_alone_window_does_not_set_the_baseline():
    fed = {"gap": [np.array([1e-4, 2e-4])], "fed": [_window(2.75), _window(2.75), _window(2.75)]}
    # The competitor's own alone window was one of the host's slow ones (1.5x): alone,
    # it would read its 10% inflation as -27%.
    fed["alone"] = [_window(3.75)]
    others = [_window(2.5), _window(2.5), _window(2.55), _window(2.45)]
    out = step_tax._summary(fed, [*fed["alone"], *others])
    assert out["step_alone_p50_ms"] == pytest.approx(2.5, abs=0.01)
    assert out["inflation_p50_pct"] == pytest.approx(10.0, abs=0.5)


def test_a_slow_fed_epoch_does_not_set_the_fed_figure():
    v = {"gap": [np.array([1e-4])], "alone": [_window(2.5)]}
    v["fed"] = [_window(2.75), _window(4.1), _window(2.75)]
    out = step_tax._summary(v, [_window(2.5)] * 3)
    assert out["step_fed_p50_ms"] == pytest.approx(2.75, abs=0.01)
    assert out["gap_p50_ms"] == pytest.approx(0.1)


def test_goals_show_rays_figure_and_the_floor_beside_each_target():
    report = pytest.importorskip("benchmarks.report")
    row = dict(inflation_p50_pct=8.0, gap_p95_ms=0.5)
    tax = {
        "trd": row,
        "ray_torch": dict(inflation_p50_pct=60.0, gap_p95_ms=1.25),
        "floor": dict(inflation_p50_pct=-1.0, gap_p95_ms=0.02),
    }
    goals = report.step_tax_goals(tax)
    assert [(g["setting"], g["met"]) for g in goals] == [("trd", True), ("trd", False)]
    assert goals[0]["target"] == "<= +10% (ray_torch: +60%; floor: -1%)"
    assert goals[1]["target"] == "<= 0.1 ms (ray_torch: 1.250 ms; floor: 0.020 ms)"
