"""Resume filter cost: loader throughput with 0, 1M and 10M consumed IDs (workload 1).

Workload 1 rows (uint8 (3, 64, 64) + an int64 id), two inputs: the materialized dataset
(consumed rows dropped in stage 3: an appended stage would be a task of its own
re-writing every block) and the same streamed through a map_batches (the filter fused
into that map task, on the cluster). Interleaved repetitions of: no resume, and resumed
epochs whose consumed set holds 0, 1M or 10M IDs. Half of the dataset's rows are among
them, either as a "prefix" (what an epoch cut short without a global shuffle leaves; a
local shuffle only blurs its edge) or "scattered" (after a global random_shuffle
upstream: holes in every block); the rest of the IDs lie outside the dataset.

A 10M-ID set belongs to an epoch of >= 10M rows, which does not fit this machine with
workload-1 rows (120 GB). So each case runs at two dataset sizes, and its extra time
over no resume (for the same rows kept) is split into a per-epoch fixed cost and a
per-row cost; the loss is projected to an epoch of 10M workload-1 rows from those.

    python -m benchmarks.bench_resume [--reps 5] [--rows 20000,40000]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

COUNTS = (0, 1_000_000, 10_000_000)
PROJECT_ROWS = 10_000_000


def measure(n: int, reps: int) -> tuple[dict[str, float], dict[str, int], dict]:
    """Median rows/s and rows yielded per case for an n-row dataset (and the states)."""
    import pyarrow as pa
    import ray

    import torch_raydata as trd
    from torch_raydata.resume import ConsumedSet, ids_as_uint64

    img = np.random.default_rng(0).integers(0, 255, (n, 3, 64, 64), dtype=np.uint8)
    ds = ray.data.from_numpy(img).add_column(
        "id", lambda t: pa.array(np.arange(len(t))), batch_format="pyarrow"
    )
    ds = ds.materialize()
    streamed = ds.map_batches(lambda t: t, batch_format="pyarrow", zero_copy_batch=True)
    inputs = {"materialized": ds, "streamed": streamed}
    rng = np.random.default_rng(1)
    owns = {"prefix": np.arange(n // 2), "scattered": rng.choice(n, n // 2, replace=False)}

    def state(count: int, pattern: str) -> dict:
        own = owns[pattern] if count else np.empty(0, dtype=np.int64)
        keys = np.concatenate([own, np.arange(n, n + count - len(own), dtype=np.int64)])
        s = ConsumedSet()
        s.add(ids_as_uint64(keys))
        st = trd.RayIterableDataset(ds, batch_size=256, id_column="id").state_dict()
        st["consumed"] = s.encode()
        return st

    states = {
        f"{k:,} IDs" + ("" if k == 0 else f", {pattern}"): state(k, pattern)
        for k in COUNTS
        for pattern in (("prefix",) if k == 0 else ("prefix", "scattered"))
    }
    rates: dict[str, list[float]] = {}
    rows_of: dict[str, int] = {}

    def run(label: str, st: dict | None, data) -> None:  # noqa: ANN001
        loader = trd.RayIterableDataset(data, batch_size=256, id_column="id")
        if st is not None:
            loader.load_state_dict(st)
        t = time.perf_counter()
        rows = sum(b["data"].shape[0] for b in loader)
        rates.setdefault(label, []).append(rows / (time.perf_counter() - t))
        rows_of[label] = rows
        loader.close()

    for kind, data in inputs.items():
        run(f"{kind} warmup", None, data)
    for _ in range(reps):
        for kind, data in inputs.items():
            run(f"{kind}: no resume", None, data)
            for label, st in states.items():
                run(f"{kind}: resume, {label}", st, data)
    medians = {k: float(np.median(v)) for k, v in rates.items() if not k.endswith("warmup")}
    return medians, rows_of, states


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", default="20000,40000", help="two dataset sizes, comma-separated")
    a = p.parse_args()
    import pyarrow as pa
    import ray

    from torch_raydata.resume import ConsumedSet, drop_consumed, ids_as_uint64

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    sizes = [int(s) for s in a.rows.split(",")]
    runs = {n: measure(n, a.reps) for n in sizes}

    for n, (med, rows, _) in runs.items():
        print(f"\n{n:,}-row dataset, median of {a.reps}\n")
        print("| case | rows yielded | rows/s | ratio to no resume |")
        print("|---|---:|---:|---:|")
        for label, m in med.items():
            base = med[label.split(":")[0] + ": no resume"]
            print(f"| {label} | {rows[label]:,} | {m:,.0f} | {m / base:.2f} |")

    if len(sizes) == 2:
        (n1, (m1, r1, _)), (n2, (m2, r2, _)) = runs.items()
        print(
            f"\nExtra time over no resume for the same rows kept, split into fixed + per row;"
            f" loss projected to an epoch of {PROJECT_ROWS:,} workload-1 rows\n"
        )
        print("| case | fixed ms per epoch | extra ns per row | projected loss |")
        print("|---|---:|---:|---:|")
        for label in m1:
            if "resume," not in label:
                continue
            base1 = m1[label.split(":")[0] + ": no resume"]
            base2 = m2[label.split(":")[0] + ": no resume"]
            x1 = r1[label] / m1[label] - r1[label] / base1
            x2 = r2[label] / m2[label] - r2[label] / base2
            per_row = (x2 - x1) / max(1, r2[label] - r1[label])
            fixed = x1 - per_row * r1[label]
            t_row = 1 / ((base1 + base2) / 2)
            kept = PROJECT_ROWS / 2  # half of the epoch consumed, as measured
            loss = 1 - (kept * t_row) / (kept * t_row + max(0.0, fixed) + per_row * kept)
            print(f"| {label} | {fixed * 1e3:.1f} | {per_row * 1e9:.0f} | {loss:.1%} |")

    # The filter alone, on one 10k-row block, against 10M consumed IDs (scattered).
    n = sizes[0]
    own = np.random.default_rng(1).choice(n, n // 2, replace=False)
    consumed = ConsumedSet()
    consumed.add(ids_as_uint64(np.concatenate([own, np.arange(n, n + 10_000_000)])))
    bitmap = consumed.bitmap()
    block = pa.table({"id": pa.array(np.arange(10_000))})
    t = time.perf_counter()
    for _ in range(50):
        drop_consumed(block, bitmap, "id")
    per_row = (time.perf_counter() - t) / 50 / 10_000
    print(
        f"\nfilter cost: {per_row * 1e9:.0f} ns per row (10k-row block, half of it consumed, "
        f"10M IDs in the set); in the object store per node: {len(consumed.serialized()):,} "
        f"bytes (a sorted array would take {8 * len(consumed) / 2**20:.0f} MiB)"
    )
    states = runs[sizes[0]][2]
    for label in ("10,000,000 IDs, prefix", "10,000,000 IDs, scattered"):
        enc = ConsumedSet.decode(states[label]["consumed"]).encode()
        print(f"checkpoint size, {label}: {len(enc['bytes']) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
