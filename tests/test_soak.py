"""Soak: 30 shuffled epochs over a small dataset on the session's Ray; the process's memory,
its threads and the object store stay flat.

After each epoch (every stage closed): RSS (``/proc/self/status`` VmRSS), threads (Python's
and the kernel's count for the process) and the object store (this process's object
references, and the cluster's plasma bytes in use; see ``tests/faults/_probes.py``).
Asserted: from epoch 2 on (allocators and Ray's pools warm up in epochs 0-1) every figure
stays within 5% of its epoch-2 value, with a small absolute slack for figures near zero
(the object store is empty between epochs: 1 MiB; threads: 2). Not a speed test: the
figures are printed as a table.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import torch_raydata as trd

from .faults._probes import driver_refs, plasma_used, settle

pytestmark = [pytest.mark.usefixtures("ray_session")]

EPOCHS, ROWS, BATCH = 30, 20_000, 256
TOLERANCE = 0.05
SLACK = {"rss_mb": 0.0, "py_threads": 2, "os_threads": 2, "refs": 0, "plasma_mb": 1.0}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _figures(refs_baseline: int) -> dict[str, float]:
    # Ray releases a finished epoch's blocks asynchronously: wait for the references to
    # drop back (deadline, not a sleep), then read everything.
    refs = settle(lambda: driver_refs()[0], lambda v: v <= refs_baseline, 10.0)
    return {
        "rss_mb": _status("VmRSS") / 1024,
        "py_threads": threading.active_count(),
        "os_threads": _status("Threads"),
        "refs": refs,
        "plasma_mb": plasma_used() / 2**20,
    }


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_thirty_shuffled_epochs_keep_memory_threads_and_object_store_flat():
    import ray

    def payload(b):
        ids = b["id"]
        return {"id": ids, "x": np.repeat(ids[:, None], 16, axis=1).astype(np.float32)}

    ds = ray.data.range(ROWS, override_num_blocks=10).map_batches(payload, batch_size=None)
    loader = trd.RayIterableDataset(
        ds, batch_size=BATCH, num_workers=2, shuffle_buffer_size=2_000, shuffle_seed=0
    )
    refs_baseline = driver_refs()[0]
    rows: list[dict[str, float]] = []
    for epoch in range(EPOCHS):
        seen = 0
        for b in loader:
            seen += len(b["id"])
        assert seen == ROWS
        st = loader.stats()
        rows.append({"epoch": epoch, **_figures(refs_baseline), "rows_per_s": st.rows_per_second})
    loader.close()

    keys = list(SLACK)
    print("\nsoak: " + " ".join(f"{k:>11}" for k in ["epoch", *keys, "rows_per_s"]))
    for r in rows:
        print("soak: " + " ".join(f"{r[k]:>11.1f}" for k in ["epoch", *keys, "rows_per_s"]))
    ref = rows[2]
    worst = {}
    for k in keys:
        values = [r[k] for r in rows[2:]]
        limit = max(abs(ref[k]) * TOLERANCE, SLACK[k])
        worst[k] = max(abs(v - ref[k]) for v in values)
        print(f"soak: {k}: epoch 2 = {ref[k]:.1f}, max drift after = {worst[k]:.2f} (limit {limit:.2f})")
        assert worst[k] <= limit, f"{k} drifted: {[round(v, 1) for v in values]}"
