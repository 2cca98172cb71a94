"""The A/B experiments behind NOTES.md, each interleaved in one process.

    python -m benchmarks.experiments source-copy    # P1: per-epoch Dataset deep copy (stage 1)
    python -m benchmarks.experiments iter-profile   # cProfile of iter(ds) + first batch
    python -m benchmarks.experiments pool           # BufferPool vs torch.empty per batch
    python -m benchmarks.experiments fill           # tensor.fill_ vs numpy fill (intra-op threads)
    python -m benchmarks.experiments torch-threads  # workload 3 with torch intra-op threads 2 vs 1

Patches are applied to torch_raydata *in this process only* (monkeypatching), to measure a
proposed change before anyone makes it; nothing in torch_raydata/ is edited.
"""

from __future__ import annotations

import cProfile
import gc
import os
import pstats
import sys
import timeit
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPS = int(os.environ.get("BENCH_REPS", "8"))


def _ab(
    variants: dict[str, tuple[Any, Callable[[], None] | None]], id_column: str, ttfb: bool = False
) -> None:
    """Interleave one epoch of each variant REPS times; a variant is (competitor, setup)."""
    from benchmarks.measure import run_epoch, time_to_first_batch

    gc.collect()
    gc.freeze()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    first: dict[str, list[float]] = {k: [] for k in variants}
    for comp, setup in variants.values():
        if setup is not None:
            setup()
        run_epoch(comp.epoch, id_column)  # warm-up
    for _ in range(REPS):
        for name, (comp, setup) in variants.items():
            if setup is not None:
                setup()
            r = run_epoch(comp.epoch, id_column)
            rates[name].append(r.rows_per_s)
            cpu[name].append(r.cpu_seconds / r.rows * 1e6)
            if ttfb:
                first[name].append(time_to_first_batch(comp, id_column) * 1e3)
    for name in variants:
        v = rates[name]
        extra = f"; first batch median {np.median(first[name]):.1f} ms" if ttfb else ""
        print(
            f"{name:28s} rows/s median {np.median(v):10,.0f} (min {min(v):,.0f}, max {max(v):,.0f}); "
            f"CPU {np.median(cpu[name]):.2f} ms/1k rows{extra}"
        )
    print(f"load average now: {os.getloadavg()[0]:.1f} (2 cores)")


def _setup(workload: str) -> Any:
    from benchmarks.bench import init_ray
    from benchmarks.workloads import build_workload

    init_ray()
    return build_workload(workload, 20_000, 16, {})


def source_copy() -> None:
    """P1: RaySource.open deep-copies the Dataset every epoch, which drops Ray's execution
    cache, so a materialized dataset starts a streaming executor every epoch."""
    from ray.data import Dataset

    from benchmarks.competitors import TRD_BEST, Trd
    from torch_raydata.pipeline import source

    wl = _setup("fixed")
    original = source.RaySource.open

    def cached_open(self: Any, transform: Any = None) -> Any:
        d = self.data
        cached = isinstance(d, Dataset) and d._cache.get_bundle(d._logical_plan.dag) is not None
        if transform is None and cached and not self.preserve_order:
            return source.EpochBlocks(d.iterator())  # cache hit: no executor, no write-back
        return original(self, transform)

    def use(fn: Any) -> Callable[[], None]:
        return lambda: setattr(source.RaySource, "open", fn)

    _ab(
        {
            "open() deep copy (current)": (Trd(wl, "a", **TRD_BEST), use(original)),
            "open() cached, no copy": (Trd(wl, "b", **TRD_BEST), use(cached_open)),
        },
        wl.id_column,
        ttfb=True,
    )
    source.RaySource.open = original


def iter_profile() -> None:
    import torch_raydata as trd

    wl = _setup("fixed")
    ds = trd.RayIterableDataset(wl.dataset, batch_size=256, num_workers=2, prefetch_batches=8)
    for _ in range(3):
        it = iter(ds)
        next(it)
        it.close()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        it = iter(ds)
        next(it)
        it.close()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


def pool() -> None:
    import torch_raydata as trd
    from benchmarks.competitors import Competitor

    wl = _setup("fixed")

    class Plain(Competitor):
        def __init__(self, **kw: Any) -> None:
            super().__init__(wl)
            self.ds = trd.RayIterableDataset(
                wl.dataset, batch_size=256, num_workers=2, prefetch_batches=8, **kw
            )

        def epoch(self) -> Any:
            return iter(self.ds)

    _ab(
        {
            "BufferPool (default)": (Plain(), None),
            "torch.empty per batch": (Plain(collate_fn=trd.collate.DefaultCollate()), None),
        },
        wl.id_column,
    )


def fill() -> None:
    t = torch.empty((256, 512), dtype=torch.int32)
    cases = {
        f"tensor.fill_(0), {torch.get_num_threads()} intra-op threads": lambda: t.fill_(0),
        "tensor.numpy().fill(0)": lambda: t.numpy().fill(0),
        "torch.zeros": lambda: torch.zeros((256, 512), dtype=torch.int32),
    }
    for name, fn in cases.items():
        ts = timeit.repeat(fn, number=50, repeat=10)
        print(
            f"{name:40s} min {min(ts) / 50 * 1e6:8.1f} us  median {np.median(ts) / 50 * 1e6:8.1f} us"
        )
    torch.set_num_threads(1)
    ts = timeit.repeat(lambda: t.fill_(0), number=50, repeat=10)
    print(
        f"{'tensor.fill_(0), 1 intra-op thread':40s} min {min(ts) / 50 * 1e6:8.1f} us  median {np.median(ts) / 50 * 1e6:8.1f} us"
    )
    print(f"load average now: {os.getloadavg()[0]:.1f} (2 cores)")


def torch_threads() -> None:
    from benchmarks.competitors import make_competitor

    wl = _setup("tokens")
    comp = make_competitor("trd_best", wl)
    default = torch.get_num_threads()
    _ab(
        {
            f"torch threads {default} (default)": (comp, lambda: torch.set_num_threads(default)),
            "torch threads 1": (comp, lambda: torch.set_num_threads(1)),
        },
        wl.id_column,
    )


EXPERIMENTS = {
    "source-copy": source_copy,
    "iter-profile": iter_profile,
    "pool": pool,
    "fill": fill,
    "torch-threads": torch_threads,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in EXPERIMENTS:
        sys.exit(f"usage: python -m benchmarks.experiments {{{'|'.join(EXPERIMENTS)}}}")
    EXPERIMENTS[sys.argv[1]]()
