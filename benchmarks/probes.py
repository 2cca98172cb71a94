"""Small probes behind benchmarks/NOTES.md entries 12-14 (workload-1 data, one process).

    python -m benchmarks.probes pipeline   # serial collate vs EpochRun (fake fetcher) vs trd
    python -m benchmarks.probes w4         # timeline of slow next() calls with a 5 ms step
    python -m benchmarks.probes shuffle    # shuffled epochs, trd vs iter_torch_batches
    python -m benchmarks.probes ttfb       # cold starts to the first batch, trd vs Ray

Each prints medians of interleaved rounds; read them as A/B within one run (NOTES.md).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ROWS, BLOCK_ROWS, BATCH = 20_000, 1_250, 256


def _dataset() -> tuple[Any, list[Any]]:
    """Workload 1 as in the harness: 16 materialized blocks of uint8 (3, 64, 64) + label;
    also the blocks as Arrow tables read back from the object store."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    img = np.random.default_rng(0).integers(0, 255, (ROWS, 3, 64, 64), dtype=np.uint8)
    tables = [
        pa.table(
            {
                "image": ArrowTensorArray.from_numpy(img[a : a + BLOCK_ROWS]),
                "label": np.arange(a, a + BLOCK_ROWS),
            }
        )
        for a in range(0, ROWS, BLOCK_ROWS)
    ]
    ds = ray.data.from_arrow(tables).materialize()
    return ds, ray.get(ds.to_arrow_refs())


def _rounds(variants: dict[str, Callable[[], Iterator[Any]]], rounds: int, epochs: int) -> None:
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, make in variants.items():
            t, n = time.perf_counter(), 0
            for _ in range(epochs):
                for b in make():
                    n += len(b["label"])
            rates[name].append(n / (time.perf_counter() - t))
    for name, v in rates.items():
        print(
            f"{name:40s} {np.median(v):>10,.0f} rows/s  (rounds: {', '.join(f'{x / 1e3:.0f}k' for x in v)})"
        )


def _fake_run(tables: list[Any], workers: int, pool: Any) -> Any:
    from tests.fakes import FakeFetcher
    from torch_raydata.collate import DefaultCollate
    from torch_raydata.pipeline.run import EpochRun, PipelineConfig
    from torch_raydata.pipeline.types import SourceBlock
    from torch_raydata.transports import LocalTransport

    store = dict(enumerate(tables))
    blocks = [
        SourceBlock(ref=i, size_bytes=t.nbytes, num_rows=t.num_rows) for i, t in store.items()
    ]
    config = PipelineConfig(batch_size=BATCH, num_workers=workers, prefetch_batches=4)
    return EpochRun(
        iter(blocks), FakeFetcher(store), DefaultCollate(allocator=pool), LocalTransport(), config
    )


def pipeline() -> None:
    import torch_raydata as trd
    from torch_raydata.collate import DefaultCollate
    from torch_raydata.memory.buffers import BufferPool

    ds, tables = _dataset()
    pool = BufferPool()
    collate = DefaultCollate(allocator=pool)
    slices = [t.slice(i, BATCH) for t in tables for i in range(0, t.num_rows, BATCH)]
    loaders = {w: trd.RayIterableDataset(ds, batch_size=BATCH, num_workers=w) for w in (2, 4)}
    gc.freeze()
    _rounds(
        {
            "serial collate loop (no threads, no Ray)": lambda: (collate(s) for s in slices),
            "EpochRun, fake fetcher, w1": lambda: _fake_run(tables, 1, pool),
            "EpochRun, fake fetcher, w2": lambda: _fake_run(tables, 2, pool),
            "EpochRun, fake fetcher, w4": lambda: _fake_run(tables, 4, pool),
            "RayIterableDataset w2": lambda: iter(loaders[2]),
            "RayIterableDataset w4": lambda: iter(loaders[4]),
            "ray iter_torch_batches": lambda: iter(
                ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=4)
            ),
        },
        rounds=5,
        epochs=3,
    )


def w4() -> None:
    import torch_raydata as trd
    from torch_raydata.pipeline import run

    ds, _ = _dataset()
    spans: list[tuple[float, float]] = []
    inner = run._Collate.__call__

    def timed(self: Any, batch: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(self, batch)
        spans.append((t0, time.perf_counter()))
        return out

    run._Collate.__call__ = timed  # type: ignore[method-assign]
    loader = trd.RayIterableDataset(ds, batch_size=BATCH)
    gc.freeze()
    calls, ready = [], []
    for _ in range(3):
        it = iter(loader)
        while True:
            ready.append(it._pool._s.out.qsize())  # batches waiting when the step asks
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            calls.append((t, time.perf_counter()))
            # Dropped after the timer, as `for batch in loader` does: freeing a torch
            # tensor releases the GIL, and a free inside the timed call measured the
            # GIL handoff it causes, not the loader (NOTES.md 15).
            del batch
            time.sleep(0.005)  # the training step
    run._Collate.__call__ = inner  # type: ignore[method-assign]
    d = np.array([e - s for s, e in calls])
    print(
        f"next() from outside: p50 {np.percentile(d, 50) * 1e3:.3f} ms, p95 {np.percentile(d, 95) * 1e3:.3f} ms"
    )
    slow = [(i, s, e) for i, (s, e) in enumerate(calls) if e - s > 0.0004]
    print(
        f"{len(slow)} of {len(calls)} calls > 0.4 ms; batches ready at those calls: {[ready[i] for i, _, _ in slow]}"
    )
    for _, s, e in slow[:10]:
        hits = [
            (round((a - s) * 1e3, 2), round((b - s) * 1e3, 2)) for a, b in spans if a < e and b > s
        ]
        print(
            f"  {1e3 * (e - s):6.3f} ms; collates overlapping (start, end ms from the call): {hits}"
        )


def shuffle() -> None:
    import torch_raydata as trd

    ds, _ = _dataset()
    loader = trd.RayIterableDataset(ds, batch_size=BATCH, shuffle_buffer_size=2048, shuffle_seed=0)
    gc.freeze()
    _rounds(
        {
            "trd, shuffle buffer 2048": lambda: iter(loader),
            "ray iter_torch_batches, local shuffle 2048": lambda: iter(
                ds.iter_torch_batches(
                    batch_size=BATCH, prefetch_batches=4, local_shuffle_buffer_size=2048
                )
            ),
        },
        rounds=4,
        epochs=3,
    )


def ttfb() -> None:
    """Cold starts as the harness times them: build the loader, iter(), first next()."""
    import torch_raydata as trd

    ds, _ = _dataset()
    gc.freeze()
    settings: dict[str, dict[str, int]] = {
        "trd (default)": {},
        "trd w2 p8": {"num_workers": 2, "prefetch_batches": 8},
    }
    res: dict[str, list[float]] = {name: [] for name in [*settings, "ray iter_torch_batches"]}
    phases: dict[str, list[tuple[float, float, float]]] = {name: [] for name in settings}

    def drain(it: Iterator[Any]) -> None:
        for _ in it:  # a cold start cut short poisons the next one (NOTES.md 9)
            pass

    for _ in range(15):
        for name, kwargs in settings.items():
            t0 = time.perf_counter()
            loader = trd.RayIterableDataset(ds, batch_size=BATCH, **kwargs)
            t1 = time.perf_counter()
            it = iter(loader)
            t2 = time.perf_counter()
            next(it)
            t3 = time.perf_counter()
            res[name].append(t3 - t0)
            phases[name].append((t1 - t0, t2 - t1, t3 - t2))
            drain(it)
            loader.close()
        t0 = time.perf_counter()
        it = iter(ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=4))
        next(it)
        res["ray iter_torch_batches"].append(time.perf_counter() - t0)
        drain(it)
    for name, v in res.items():
        line = f"{name:24s} median {np.median(v[1:]) * 1e3:.1f} ms (first start excluded)"
        if name in phases:
            build, start, first = np.median(np.array(phases[name][1:]), axis=0) * 1e3
            line += f"; build {build:.1f}, iter() {start:.1f}, first next() {first:.1f} ms"
        print(line)


PROBES = {"pipeline": pipeline, "w4": w4, "shuffle": shuffle, "ttfb": ttfb}

if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("probe", choices=sorted(PROBES))
    PROBES[p.parse_args().probe]()
