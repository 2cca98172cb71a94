"""What is measured, identically for every competitor.

Owns: the timed epoch loop (wait around every ``next()``, touching every batch, the
optional training step), trainer-process CPU time, peak RSS, time to first batch
from a cold loader, and the batch-ownership check. Does not own which loaders exist
(``competitors.py``) or how results are summarised (``report.py``).

Definitions (also in README.md):
    rows/s          rows / wall time from building the epoch's iterator to StopIteration
    wait            seconds from one step's end to the next batch in hand, in a natural
                    `for batch in loader` loop: next() plus releasing the previous batch
    time to first   cold loader built + iter() + first next(), in a separate pass
    CPU / 1k rows   getrusage(RUSAGE_SELF) user+sys of THIS process (all its threads) per
                    1,000 rows; Ray tasks and DataLoader workers run in other processes
    peak RSS        max of /proc/self/statm (resident - shared pages, i.e. private
                    memory; object-store pages mapped in are shared) sampled every 4th
                    batch by the epoch loop, minus the value at the start of the epoch
"""

from __future__ import annotations

import gc
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["EpochResult", "run_epoch", "time_to_first_batch", "owns_memory", "RssPeak"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _private_rss() -> int:
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


class RssPeak:
    """Peak private RSS, sampled by the epoch loop itself (between batches, outside the
    timed wait).

    Not a sampling thread: a Python thread waking every 5 ms takes the GIL from the
    loader's threads and the training step (it sat in every competitor's wait
    percentiles, e.g. workload 4's 5 ms step; docs/performance.md). Memory held by buffered
    batches persists across batch boundaries, so sampling there sees it."""

    EVERY = 4  # batches between samples (one read of /proc/self/statm is ~10-20 us)

    def __init__(self) -> None:
        self.start_value = _private_rss()
        self.peak = self.start_value

    def sample(self) -> None:
        value = _private_rss()
        if value > self.peak:
            self.peak = value


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def touch(batch: dict[str, Any], id_column: str) -> int:
    """Read one element of every tensor/array (lazy paths cannot skip work); rows in it."""
    acc = 0
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            if value.numel():
                acc += int(value[(0,) * value.dim()])
        elif isinstance(value, np.ndarray) and value.size:
            acc += int(value.flat[0])
    return len(batch[id_column])


@dataclass
class EpochResult:
    rows: int
    batches: int
    seconds: float
    cpu_seconds: float
    waits: np.ndarray = field(repr=False)
    first_wait: float
    rss_peak_delta: int
    rss_peak: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def run_epoch(
    make_iter: Callable[[], Iterator[Any]], id_column: str, step_ms: float = 0.0
) -> EpochResult:
    """One full epoch, the same loop for every competitor: ``for batch in loader``.

    A wait is the time from the end of one step to the next batch in hand, as the
    training step's thread meets it: ``next()`` *and* the release of the previous batch,
    which happens when the loop rebinds ``batch`` (issue 13: dropping the batch before
    the timer hid 0.6-1 ms at p95 under a 5 ms step)."""
    gc.collect()
    step = step_ms / 1e3
    waits: list[float] = []
    rows = 0
    rss = RssPeak()
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    it = make_iter()
    end = time.perf_counter()
    for batch in it:
        waits.append(time.perf_counter() - end)
        rows += touch(batch, id_column)
        if len(waits) % RssPeak.EVERY == 0:
            rss.sample()  # while this batch (and the buffered ones) are held
        if step:
            time.sleep(step)
        end = time.perf_counter()
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0
    rss.sample()
    arr = np.asarray(waits)
    return EpochResult(
        rows=rows,
        batches=len(waits),
        seconds=seconds,
        cpu_seconds=cpu,
        waits=arr,
        # The first wait is measured from iter() returning, the epoch clock from before it.
        first_wait=float(arr[0]) if len(arr) else float("nan"),
        rss_peak_delta=rss.peak - rss.start_value,
        rss_peak=rss.peak,
    )


def time_to_first_batch(competitor: Any, id_column: str) -> float:
    """Seconds from building a fresh loader to holding its first batch.

    The rest of that epoch is then consumed, untimed: abandoning it after one batch makes
    Ray cancel the tasks still running (on a busy 2-core machine their workers restart
    for seconds), and the NEXT competitor's cold start would pay for it.
    """
    gc.collect()
    start = time.perf_counter()
    it = competitor.cold()
    batch = next(it)
    seconds = time.perf_counter() - start
    touch(batch, id_column)
    del batch
    for rest in it:
        touch(rest, id_column)
    competitor.end(it)
    return seconds


def owns_memory(competitor: Any, id_column: str, column: str) -> float:
    """Two full epochs: write into every batch, then look for the writes.

    Epoch A adds 1 in place to the first element of every row of every batch. Epoch B
    reads those elements back (rows found by ``id_column``). A row showing the written
    value came in a batch that was a view of storage outliving it (e.g. object-store
    memory): that batch did not own its memory, and a training step modifying it in
    place corrupted the dataset. Returns the fraction of rows seen through views.
    """
    written: dict[int, int] = {}
    for batch in competitor.epoch():
        target = batch[column]
        ids = batch[id_column].tolist()
        flat = target.reshape(len(ids), -1)  # a view for contiguous tensors
        if flat.data_ptr() != target.data_ptr():
            raise AssertionError("ownership check needs a contiguous tensor")
        flat[:, 0] += 1
        written.update(zip(ids, flat[:, 0].tolist(), strict=True))
    leaked = 0
    seen = 0
    for batch in competitor.epoch():
        ids = batch[id_column].tolist()
        first = batch[column].reshape(len(ids), -1)[:, 0].tolist()
        for row_id, value in zip(ids, first, strict=True):
            seen += 1
            leaked += value == written[row_id]
    if seen != len(written):
        raise AssertionError(f"ownership check saw {seen} rows in epoch B, {len(written)} in A")
    return leaked / max(1, seen)
