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
