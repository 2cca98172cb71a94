"""Resume filter cost: loader throughput with 0, 1M and 10M consumed IDs (workload 1).

Runs interleaved repetitions of: no resume (baseline) and resumed epochs whose consumed
set holds 0, 1M and 10M IDs (half of the dataset's own rows among them, so the filter
really drops rows; the rest lie outside the dataset, as after a long epoch on a big
one). Reports rows/s of the rows that remain, as ratios to the baseline, plus the
filter's own cost per row and the bytes the set takes per node (8 B per ID).

    python -m benchmarks.bench_resume [--reps 3] [--rows 20000]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rows", type=int, default=20_000)
    a = p.parse_args()
    import pyarrow as pa
    import ray

    import torch_raydata as trd
    from torch_raydata.resume import ConsumedSet, drop_consumed, ids_as_uint64

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    n = a.rows
    img = np.random.default_rng(0).integers(0, 255, (n, 3, 64, 64), dtype=np.uint8)
    ds = ray.data.from_numpy(img).add_column(
        "id", lambda t: pa.array(np.arange(len(t))), batch_format="pyarrow"
    )
    ds = ds.materialize()
    ids_seen = ds.to_arrow_refs()  # noqa: F841 - keep blocks alive
    rng = np.random.default_rng(1)
    own = rng.choice(n, n // 2, replace=False)  # half the dataset was consumed

    def consumed_state(count: int) -> dict | None:
        if count == 0:
            keys = np.empty(0, dtype=np.int64)
        else:
            outside = np.arange(n, n + count - len(own), dtype=np.int64)
            keys = np.concatenate([own, outside])
        s = ConsumedSet()
        s.add(ids_as_uint64(keys))
        loader = trd.RayIterableDataset(ds, batch_size=256, id_column="id")
        st = loader.state_dict()
        st["consumed"] = s.encode()
        return st

    states = {k: consumed_state(k) for k in (0, 1_000_000, 10_000_000)}
    results: dict[str, list[float]] = {}

    def run(label: str, state: dict | None) -> None:
        loader = trd.RayIterableDataset(ds, batch_size=256, id_column="id")
        if state is not None:
            loader.load_state_dict(state)
        t = time.perf_counter()
        rows = sum(b["data"].shape[0] for b in loader)
        results.setdefault(label, []).append(rows / (time.perf_counter() - t))
        loader.close()

    run("warmup", None)
    for _ in range(a.reps):
        run("no resume", None)
        for k, st in states.items():
            run(f"resume, {k:,} IDs", st)
    base = float(np.median(results["no resume"]))
    print(f"| case | rows/s (median of {a.reps}) | ratio to no resume |")
    print("|---|---:|---:|")
    for label, v in results.items():
        if label == "warmup":
            continue
        m = float(np.median(v))
        print(f"| {label} | {m:,.0f} | {m / base:.2f} |")
    # The filter alone, on one 10k-row block, against 10M keys.
    keys = np.sort(ids_as_uint64(np.concatenate([own, np.arange(n, n + 10_000_000)])))
    block = pa.table({"id": pa.array(np.arange(10_000))})
    t = time.perf_counter()
    for _ in range(20):
        drop_consumed(block, keys, "id")
    per_row = (time.perf_counter() - t) / 20 / 10_000
    print(
        f"\nfilter cost: {per_row * 1e9:.0f} ns per row against 10M keys; "
        f"the key array is {keys.nbytes / 2**20:.0f} MiB per node (8 B per ID)"
    )
    enc = ConsumedSet.decode(states[10_000_000]["consumed"]).encode()
    print(f"checkpoint size of the 10M set: {len(enc['bytes']) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
