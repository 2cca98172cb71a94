"""Run one competitor on workload 1 for many epochs, for a sampling profiler to watch.

    .venv/bin/py-spy record --threads --nonblocking -r 250 -f raw -o /tmp/trd.txt -- \\
        .venv/bin/python -m benchmarks.profile_w1 --competitor trd_best --epochs 40
    .venv/bin/python -m benchmarks.profile_w1 --summary /tmp/trd.txt   # samples per thread/function

Prints rows/s per epoch and torch_raydata's per-stage busy seconds (``ds.stats()``).
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench import init_ray  # noqa: E402
from benchmarks.competitors import make_competitor  # noqa: E402
from benchmarks.measure import run_epoch  # noqa: E402
from benchmarks.workloads import build_workload  # noqa: E402


def summarize_raw(path: str, top: int = 25) -> None:
    """py-spy ``-f raw`` (collapsed stacks: ``frame;frame;... count``): samples by thread
    and by leaf function (self time), plus inclusive time of a few functions of interest."""
    by_thread: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            frames = stack.split(";")
            # Setup (imports, data generation) is not the pipeline: keep the consumer's
            # samples inside the timed loop and every background thread's.
            main = "MainThread" in frames[0] or "profile_w1.py" in stack
            if main and (
                "run_epoch" not in stack or "gc.collect" in stack or "measure.py:103" in stack
            ):
                continue
            thread = "consumer (MainThread)" if main else "background threads"
            total += n
            by_thread[thread] += n
            by_leaf[f"{thread.split(' ')[-1]} :: {frames[-1]}"] += n
            for fr in set(frames[1:]):
                inclusive[fr] += n
    print(f"{total} samples")
    print("\n-- by thread --")
    for k, v in by_thread.most_common(top):
        print(f"{v:7d} {v / total:6.1%}  {k}")
    print("\n-- self (leaf) --")
    for k, v in by_leaf.most_common(top):
        print(f"{v:7d} {v / total:6.1%}  {k}")
    print("\n-- inclusive --")
    for k, v in inclusive.most_common(top * 2):
        print(f"{v:7d} {v / total:6.1%}  {k}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--competitor", default="trd_best")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--summary", help="summarise a py-spy raw file instead of running")
    args = ap.parse_args()
    if args.summary:
        summarize_raw(args.summary)
        return 0
    init_ray()
    wl = build_workload("fixed", args.rows, 16, {})
    comp = make_competitor(args.competitor, wl)
    gc.collect()
    gc.freeze()
    for epoch in range(args.epochs):
        r = run_epoch(comp.epoch, wl.id_column)
        extra = comp.extra()
        stages = extra.get("trd_stage_seconds", {})
        busy = " ".join(f"{k}={v * 1e3:.0f}ms" for k, v in stages.items() if v)
        print(
            f"epoch {epoch:3d} {r.rows_per_s:10,.0f} rows/s  {r.seconds * 1e3:6.0f} ms  "
            f"cpu {r.cpu_seconds * 1e3:5.0f} ms  {busy}",
            flush=True,
        )
    comp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
