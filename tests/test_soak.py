"""Soak: many shuffled epochs of one loader on the session's Ray; memory, threads and the
object store do not grow.

After each epoch: RSS (``/proc/self/status`` VmRSS), threads (Python's and the kernel's
count for the process), this process's object references and the cluster's plasma bytes
in use (``tests/faults/_probes.py``). The test takes its own baseline rather than
assuming a quiet process: the session's Ray and the tests before this one leave
allocator pools, Ray worker threads and caches behind, and the loader may hold part of
its next epoch between epochs.

    warm-up   WARMUP epochs, not judged (allocator arenas, Arrow's pool, Ray's worker
              pool and Ray Data's per-job actors settle)
    baseline  the MAX of each figure over the next BASELINE epochs: the between-epoch
              jitter (a next epoch prestarted or not, Ray freeing blocks late) is inside it
    judged    JUDGED more epochs; every figure must stay <= baseline + its slack
    closed    after ``close()``: references back to what the process held before the
              loader, plasma back to its level before the loader, no torch_raydata thread

Slack, and why a leak still fails: one epoch moves ROWS x ROW_BYTES ~ 5.3 MB of rows.
RSS: max(64 MiB, 10% of the baseline): glibc and Arrow keep freed memory in pools whose
size wanders by tens of MiB in a long shared session, while a loader keeping one epoch
of batches alive per epoch would add >= 5.3 MB x JUDGED = 106 MB, past the slack
(references and plasma catch smaller leaks exactly). References: one epoch's blocks
(BLOCKS): a leaked block reference per epoch adds JUDGED. Plasma: two epochs of rows
(a leaked block per epoch adds JUDGED x 0.53 MB = 10.6 MB; a leaked epoch far more).
Threads: 2 (Ray's own gRPC / event threads come and go). Not a speed test: the figures
are printed as a table.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import torch_raydata as trd

from .faults._probes import driver_refs, join_trd_threads, plasma_used, settle

pytestmark = [pytest.mark.usefixtures("ray_session")]

WARMUP, BASELINE, JUDGED = 3, 5, 20
ROWS, BLOCKS, BATCH, WIDTH = 20_000, 10, 256, 64
ROW_BYTES = 8 + 4 * WIDTH  # int64 id + WIDTH float32
EPOCH_MB = ROWS * ROW_BYTES / 2**20
SLACK = {
    "rss_mb": lambda base: max(64.0, 0.10 * base),
    "py_threads": lambda base: 2,
    "os_threads": lambda base: 2,
    "refs": lambda base: BLOCKS,
    "plasma_mb": lambda base: 2 * EPOCH_MB,
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _figures(refs_before: int) -> dict[str, float]:
    # A finished epoch's block references go when the garbage collector breaks their
    # cycles and Ray's release reaches the core worker: collect, and give Ray a deadline
    # (not a sleep) to get back to the references held before the loader. A loader that
    # already started its next epoch holds that epoch's references: the deadline passes
    # and the count is read as it is (the baseline window holds such epochs too).
    refs = settle(lambda: driver_refs()[0], lambda v: v <= refs_before, 2.0)
    return {
        "rss_mb": _status("VmRSS") / 1024,
        "py_threads": threading.active_count(),
        "os_threads": _status("Threads"),
        "refs": refs,
        "plasma_mb": plasma_used() / 2**20,
    }


def _payload(b):
    ids = b["id"]
    return {"id": ids, "x": np.repeat(ids[:, None], WIDTH, axis=1).astype(np.float32)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_many_shuffled_epochs_keep_memory_threads_and_object_store_bounded():
    import ray

    ds = ray.data.range(ROWS, override_num_blocks=BLOCKS).map_batches(_payload, batch_size=None)
    refs_before = driver_refs()[0]
    plasma_before = plasma_used() / 2**20
    loader = trd.RayIterableDataset(
        ds, batch_size=BATCH, num_workers=2, shuffle_buffer_size=2_000, shuffle_seed=0
    )
    rows: list[dict[str, float]] = []
    for epoch in range(WARMUP + BASELINE + JUDGED):
        seen: list[np.ndarray] = []
        for b in loader:
            seen.append(b["id"].numpy().copy())
        ids = np.sort(np.concatenate(seen))
        assert np.array_equal(ids, np.arange(ROWS)), f"epoch {epoch}: not every row once"
        st = loader.stats()
        assert st.buffered_batches == 0, f"epoch {epoch} ended with batches still buffered"
        rows.append({"epoch": epoch, **_figures(refs_before), "rows_per_s": st.rows_per_second})
    loader.close()
    del loader, ds  # what the dataset object itself holds goes with it

    keys = list(SLACK)
    print("\nsoak: " + " ".join(f"{k:>11}" for k in ["epoch", *keys, "rows_per_s"]))
    for r in rows:
        print("soak: " + " ".join(f"{r[k]:>11.1f}" for k in ["epoch", *keys, "rows_per_s"]))
    window = rows[WARMUP : WARMUP + BASELINE]
    judged = rows[WARMUP + BASELINE :]
    for k in keys:
        base = max(r[k] for r in window)
        limit = base + SLACK[k](base)
        worst = max(r[k] for r in judged)
        print(f"soak: {k}: baseline {base:.1f}, max after {worst:.1f} (limit {limit:.1f})")
        assert worst <= limit, f"{k} grew: {[round(r[k], 1) for r in judged]} (limit {limit:.1f})"

    # Closed: nothing the loader (or the dataset) made outlives them (Ray releases asynchronously: a deadline
    # on its report, not a sleep).
    assert join_trd_threads(within=5.0) == []
    refs = settle(lambda: driver_refs()[0], lambda v: v <= refs_before, 10.0)
    assert refs <= refs_before, f"{refs - refs_before} object references outlive the loader"
    plasma = settle(lambda: plasma_used() / 2**20, lambda v: v <= plasma_before + 1.0, 10.0)
    assert plasma <= plasma_before + 1.0, f"plasma {plasma:.1f} MiB vs {plasma_before:.1f} before"
