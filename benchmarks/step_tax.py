"""The training step's own time: what a loader costs the thread that runs the step.

    python -m benchmarks.step_tax                 # W1 data, trd / Ray / DataLoader (~3 min)
    python -m benchmarks.step_tax --reps 1 --rows 4000 --competitors trd,ray_torch

Owns the two figures of a natural ``for batch in loader: step(batch)`` loop that the
epoch loop's wait percentiles do not isolate:

(a) **between-step overhead**: from the step's return to the next step's start, i.e.
    ``next()`` plus the release of the previous batch (rebinding ``batch`` frees it on
    the step's thread), under a 5 ms step that leaves the core and the GIL free
    (``time.sleep``). ``measure.run_epoch`` times the same thing for every workload.
(b) **step inflation**: a fixed, Python-heavy step (many small torch ops on one torch
    thread, the shape of a small model's forward/backward launch loop) timed alone and
    then fed by each competitor, in one run. A loader's threads that want the GIL while
    the step runs make the step slower; on a GPU that is time the device waits for the
    kernels this thread launches.

"Alone" is timed in a window of the same length right after each competitor's (a) epoch
(same process, same data batch held). On this machine a window now and then runs ~1.5x
slow as a whole (2026-12-01: 80-step windows at p50 2.3-2.8 ms, and one in four or five
at 3.7-4.2 ms, whichever competitor came before, even after ``gc.collect()``), which
swung one competitor's (b) from +2% to +51% between runs of the same code. So the
baseline is pooled: the median over every alone window of the run, all competitors and
repetitions (the step alone does not depend on who fed the previous epoch), and a
competitor's fed figure is the median over repetitions of each fed epoch's percentile,
so one slow window moves neither side. (a) pools its gaps over all repetitions.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["PythonHeavyStep", "natural_loop", "inflation", "markdown", "main"]


class PythonHeavyStep:
    """A step whose time is Python and dispatch, not FLOPs: a forward of ``ops`` small
    torch ops on 32x32 tensors (``ops / 3`` rounds of matmul, tanh, add) and its backward.

    Reads one element of the batch's first tensor first (a lazy loader cannot skip work).
    ~2 ms here with the default 240 ops on one torch thread, bounded by this thread
    holding the GIL, like launching a small model's kernels."""

    def __init__(self, ops: int = 240) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 32, generator=gen)
        self.w = (torch.randn(32, 32, generator=gen) * 0.1).requires_grad_()
        self.rounds = max(1, ops // 3)

    def __call__(self, batch: Any) -> float:
        value = next(iter(batch.values())) if isinstance(batch, dict) else batch
        y = self.x + float(value.reshape(-1)[0])
        for _ in range(self.rounds):
            y = torch.tanh(y @ self.w).add(1.0)
        loss = y.sum()
        loss.backward()
        self.w.grad = None
        return float(loss.detach())


def natural_loop(
    it: Iterator[Any], step: Callable[[Any], Any] | None = None, step_s: float = 0.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """One epoch as a user writes it. Returns (gaps, step times, batches), seconds.

    ``gaps[i]``: from the end of step i-1 to batch i in hand (gaps[0] from the call),
    which includes releasing batch i-1: the loop variable is rebound only after
    ``next()`` returned, exactly as in ``for batch in loader``."""
    gaps: list[float] = []
    steps: list[float] = []
    end = time.perf_counter()
    for batch in it:
        got = time.perf_counter()
        gaps.append(got - end)
        if step is not None:
            step(batch)
            steps.append(time.perf_counter() - got)
        if step_s:
            time.sleep(step_s)
        end = time.perf_counter()
    return np.asarray(gaps), np.asarray(steps), len(gaps)


def _alone(step: Callable[[Any], Any], batch: Any, n: int) -> np.ndarray:
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        step(batch)
        times[i] = time.perf_counter() - t0
    return times


def inflation(
    comps: dict[str, Any],
    held: dict[str, torch.Tensor],
    reps: int,
    step_ms: float = 5.0,
    ops: int = 240,
) -> dict[str, dict[str, float]]:
    """(a) and (b) for each competitor, interleaved per repetition. ``held``: a batch
    of the same columns, the input of the step timed alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the step runs on one torch thread (the setting)
    step = PythonHeavyStep(ops)
    _alone(step, held, 50)  # warm-up: autograd's first calls are slow
    try:
        for c in comps.values():  # warm-up epoch each (untimed)
            for _ in c.epoch():
                pass
        out: dict[str, dict[str, list]] = {k: {"gap": [], "alone": [], "fed": []} for k in comps}
        for _ in range(reps):
            for k, c in comps.items():
                gc.collect()
                gaps, _, n = natural_loop(c.epoch(), step_s=step_ms / 1e3)
                out[k]["gap"].append(gaps[1:])  # gaps[0] is the epoch's first batch
                out[k]["alone"].append(_alone(step, held, n))
                gc.collect()
                _, steps, _ = natural_loop(c.epoch(), step=step)
                out[k]["fed"].append(steps)
    finally:
        torch.set_num_threads(threads)
    windows = [w for v in out.values() for w in v["alone"]]
    return {k: _summary(v, windows) for k, v in out.items()}


def _summary(v: dict[str, list], alone_windows: list[np.ndarray]) -> dict[str, float]:
    """``alone_windows``: every alone window of the run (all competitors), the baseline."""
    gap = np.concatenate(v["gap"]) * 1e3
    a50 = float(np.median([np.percentile(w, 50) for w in alone_windows])) * 1e3
    a95 = float(np.median([np.percentile(w, 95) for w in alone_windows])) * 1e3
    f50 = float(np.median([np.percentile(f, 50) for f in v["fed"]])) * 1e3
    f95 = float(np.median([np.percentile(f, 95) for f in v["fed"]])) * 1e3
    return {
        "gap_p50_ms": float(np.percentile(gap, 50)),
        "gap_p95_ms": float(np.percentile(gap, 95)),
        "gap_p99_ms": float(np.percentile(gap, 99)),
        "step_alone_p50_ms": a50,
        "step_alone_p95_ms": a95,
        "step_fed_p50_ms": f50,
        "step_fed_p95_ms": f95,
        "inflation_p50_pct": (f50 / a50 - 1) * 100,
        "inflation_p95_pct": (f95 / a95 - 1) * 100,
    }


def markdown(title: str, rows: dict[str, dict[str, float]], labels: dict[str, str]) -> str:
    head = (
        f"### {title}\n\n"
        "| loader | (a) between-step p50 ms | (a) p95 ms | (a) p99 ms "
        "| (b) step alone p50 / p95 ms (pooled) | step fed p50 / p95 ms | inflation p50 | p95 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for k, r in rows.items():
        lines.append(
            f"| {labels.get(k, k)} | {r['gap_p50_ms']:.3f} | {r['gap_p95_ms']:.3f} "
            f"| {r['gap_p99_ms']:.3f} | {r['step_alone_p50_ms']:.2f} / "
            f"{r['step_alone_p95_ms']:.2f} | {r['step_fed_p50_ms']:.2f} / "
            f"{r['step_fed_p95_ms']:.2f} | {r['inflation_p50_pct']:+.0f}% "
            f"| {r['inflation_p95_pct']:+.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .bench import STEP_TAX_TITLE, init_ray, run_step_tax
    from .competitors import LABELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--ops", type=int, default=240)
    ap.add_argument("--competitors", default="floor,trd,ray_torch,ray_numpy,dl2")
    args = ap.parse_args(argv)
    init_ray()
    keys = [k for k in args.competitors.split(",") if k]
    rows = run_step_tax({}, args.rows, args.blocks, keys, args.reps, args.step_ms, args.ops)
    print(f"load average {os.getloadavg()}", file=sys.stderr)
    print(markdown(STEP_TAX_TITLE, rows, LABELS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
