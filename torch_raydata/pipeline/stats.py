"""Counters every stage reports into, and the :class:`LoaderStats` snapshot users see.

Owns: per-stage busy seconds, rows/batches delivered and dropped, the consumer's wait
time per batch, and the buffered batches/bytes across stages 2-6 with their peaks.
Every place that holds a block or batch calls :meth:`StatsRecorder.buffer` when it takes
one and releases it when it hands it on, so nothing is buffered off the books.
"""

from __future__ import annotations

import threading
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LoaderStats", "StatsRecorder", "STAGES"]

STAGES = ("source", "prefetch", "batching", "collate", "reorder", "finalize")


@dataclass(frozen=True)
class LoaderStats:
    """A snapshot of one epoch (the current or the last finished one).

    Times in seconds except the ``wait_*_ms`` percentiles (milliseconds the training
    step waited in ``next()`` per batch). ``stage_seconds`` is busy time summed over the
    threads of a stage, so it can exceed wall time for the collate pool.

    Every time counts from ``iter()`` (the epoch's start as the training loop sees it):
    ``wall_seconds`` and ``rows_per_second`` include starting Ray's executor;
    ``time_to_first_batch`` is ``iter()`` to the first batch handed to the step;
    ``epoch_start_seconds`` is ``iter()`` to the first block from Ray (the executor's
    start, ~0 when the epoch was prestarted ``prestart_lead_seconds`` before ``iter()``).
    ``next_epoch_prestarted`` / ``next_epoch_bytes``: the next epoch's stream, started
    ahead of time, and the bytes it produced that wait for it (held to the prefetch
    window's size).
    """

    epoch: int
    batches: int
    rows: int
    rows_dropped: int
    wall_seconds: float
    time_to_first_batch: float | None
    stage_seconds: dict[str, float]
    wait_p50_ms: float
    wait_p95_ms: float
    wait_p99_ms: float
    wait_max_ms: float
    wait_total_seconds: float
    buffered_batches: int
    buffered_bytes: int
    peak_buffered_batches: int
    peak_buffered_bytes: int
    blocks: int
    notes: tuple[str, ...] = field(default=())
    epoch_start_seconds: float | None = None
    prestarted: bool = False
    prestart_lead_seconds: float | None = None
    next_epoch_prestarted: bool = False
    next_epoch_bytes: int = 0
    #: Remote collate actors working for this epoch (transport='nixl'; kept across epochs).
    collate_actors: int = 0
    #: Collate threads in this process at the end of the epoch (or now): with
    #: ``num_workers=None`` they grow from 1 while the step waits on collate.
    collate_threads: int = 0
    #: CPU milliseconds per batch that the loader's threads in this process used
    #: (prefetch, collate, finalize; not Ray's workers): time they want the GIL, which
    #: they take from the training step. Counted as each thread ends (the epoch's end).
    loader_cpu_ms_per_batch: float = 0.0
    #: The transport's staging memory, over its lifetime (``TransportStats``): pinned bytes
    #: held by batches, pinned bytes held in all, and reason -> tensors staged in pageable
    #: memory instead ("budget", "pin_failed", "not_staged").
    pinned_bytes_in_use: int = 0
    pinned_bytes_reserved: int = 0
    pageable_fallbacks: dict[str, int] = field(default_factory=dict)
    #: A MaterializedDataset's blocks kept deserialized across epochs by this dataset
    #: (zero-copy views of object-store memory the MaterializedDataset pins anyway).
    cached_blocks: int = 0
    cached_block_bytes: int = 0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def __str__(self) -> str:
        stages = ", ".join(f"{k}={v:.3f}s" for k, v in self.stage_seconds.items())
        ttfb = "n/a" if self.time_to_first_batch is None else f"{self.time_to_first_batch:.3f}s"
        if self.epoch_start_seconds is None:
            start = "not started"
        else:
            start = f"{self.epoch_start_seconds:.3f}s"
        if self.prestarted and self.prestart_lead_seconds is not None:
            start += f", prestarted {self.prestart_lead_seconds:.2f}s before iter()"
        nxt = (
            f"; next epoch prestarted ({self.next_epoch_bytes:,} B waiting)"
            if self.next_epoch_prestarted
            else ""
        )
        staging = ""
        if self.pinned_bytes_reserved or self.pageable_fallbacks:
            why = ", ".join(f"{k}={v}" for k, v in sorted(self.pageable_fallbacks.items()))
            staging = (
                f"\n  pinned staging: {self.pinned_bytes_in_use:,} B in use of "
                f"{self.pinned_bytes_reserved:,} B pinned; pageable fallbacks: {why or 'none'}"
            )
        return (
            f"epoch {self.epoch}: {self.batches} batches, {self.rows} rows "
            f"({self.rows_per_second:,.0f} rows/s from iter()), {self.rows_dropped} rows "
            f"dropped, first batch {ttfb} after iter() (epoch start {start}){nxt}\n"
            f"  consumer wait ms p50={self.wait_p50_ms:.3f} p95={self.wait_p95_ms:.3f} "
            f"p99={self.wait_p99_ms:.3f} max={self.wait_max_ms:.3f} "
            f"(total {self.wait_total_seconds:.3f}s)\n"
            f"  stage busy: {stages}; {self.collate_threads} collate threads; loader CPU in "
            f"this process {self.loader_cpu_ms_per_batch:.3f} ms/batch\n"
            f"  buffered now {self.buffered_batches} batches / {self.buffered_bytes:,} B; "
            f"peak {self.peak_buffered_batches} batches / {self.peak_buffered_bytes:,} B; "
            f"{self.blocks} blocks{staging}"
            + (
                f"; {self.cached_blocks} blocks ({self.cached_block_bytes:,} B) kept "
                "deserialized for the MaterializedDataset"
                if self.cached_blocks
                else ""
            )
        )


class StatsRecorder:
    """Thread-safe accumulator for one epoch. Cheap: a lock and a few adds per batch."""

    def __init__(self, epoch: int = 0) -> None:
        self._lock = threading.Lock()
        self.epoch = epoch
        self._start: float | None = None
        self._end: float | None = None
        self._first_batch: float | None = None
        self._first_block: float | None = None
        self._prestart_lead: float | None = None
        self._stage = dict.fromkeys(STAGES, 0.0)
        self._waits = array("d")
        self.batches = 0
        self.rows = 0
        self.rows_dropped = 0
        self.blocks = 0
        self._buf_batches = 0
        self._buf_bytes = 0
        self._peak_batches = 0
        self._peak_bytes = 0
        self._notes: list[str] = []
        self._listeners: list[Any] = []
        self.collate_actors = 0  # set by the remote epoch
        self.collate_threads = 0
        self._thread_cpu = 0.0

    def add_listener(self, listener: Any) -> None:
        """Call ``listener.on_batch(rows, wait_s)`` after each batch delivered (consumer
        thread) and ``listener.on_finish()`` once when the epoch ends (whichever thread
        closes it). E.g. ``callbacks.EpochProgressBar``. Listeners must not raise."""
        self._listeners.append(listener)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, now: float) -> None:
        """The epoch's start (``iter()``); the first call wins."""
        if self._start is None:
            self._start = now

    def first_block(self, now: float) -> None:
        """Stage 1 handed on its first block (any thread)."""
        with self._lock:
            if self._first_block is None and self._start is not None:
                self._first_block = max(0.0, now - self._start)

    def prestarted(self, lead_seconds: float) -> None:
        """This epoch's stream was started ``lead_seconds`` before ``iter()``."""
        self._prestart_lead = lead_seconds

    def finish(self, now: float) -> None:
        if self._end is None:
            self._end = now
            for listener in self._listeners:
                listener.on_finish()

    # -- reporting from stages --------------------------------------------------------
    def add_time(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._stage[stage] += seconds

    def set_collate_threads(self, n: int) -> None:
        self.collate_threads = n

    def add_thread_cpu(self, seconds: float) -> None:
        """CPU time (``time.thread_time()``) a loader thread in this process used."""
        with self._lock:
            self._thread_cpu += seconds

    def add_block(self) -> None:
        with self._lock:
            self.blocks += 1

    def add_dropped(self, rows: int, why: str) -> None:
        with self._lock:
            self.rows_dropped += rows
            self._notes.append(f"dropped {rows} rows: {why}")

    def buffer(self, batches: int, nbytes: int) -> None:
        """``batches``/``nbytes`` entered (positive) or left (negative) the pipeline's buffers."""
        with self._lock:
            self._buf_batches += batches
            self._buf_bytes += nbytes
            if self._buf_batches > self._peak_batches:
                self._peak_batches = self._buf_batches
            if self._buf_bytes > self._peak_bytes:
                self._peak_bytes = self._buf_bytes

    def clear_buffered(self) -> None:
        """After every stage has shut down nothing is buffered any more (peaks stay)."""
        with self._lock:
            self._buf_batches = 0
            self._buf_bytes = 0

    def delivered(self, rows: int, wait_s: float, now: float, nbytes: int | None = None) -> None:
        """Called on the consumer thread for each batch handed to the training step;
        ``nbytes``: the batch also leaves the buffered books (``buffer(-1, -nbytes)``)."""
        with self._lock:
            if self._first_batch is None and self._start is not None:
                self._first_batch = now - self._start
            self.batches += 1
            self.rows += rows
            self._waits.append(wait_s)
            if nbytes is not None:
                self._buf_batches -= 1
                self._buf_bytes -= nbytes
        for listener in self._listeners:
            listener.on_batch(rows, wait_s)

    # -- snapshot -----------------------------------------------------------------------
    def snapshot(self, now: float) -> LoaderStats:
        with self._lock:
            waits = np.frombuffer(self._waits, dtype=np.float64) * 1e3 if self._waits else None
            if waits is not None and len(waits):
                p50, p95, p99 = np.percentile(waits, [50, 95, 99]).tolist()
                wmax, wsum = float(waits.max()), float(waits.sum()) / 1e3
            else:
                p50 = p95 = p99 = wmax = wsum = 0.0
            end = self._end if self._end is not None else now
            wall = (end - self._start) if self._start is not None else 0.0
            return LoaderStats(
                epoch=self.epoch,
                batches=self.batches,
                rows=self.rows,
                rows_dropped=self.rows_dropped,
                wall_seconds=wall,
                time_to_first_batch=self._first_batch,
                stage_seconds=dict(self._stage),
                wait_p50_ms=p50,
                wait_p95_ms=p95,
                wait_p99_ms=p99,
                wait_max_ms=wmax,
                wait_total_seconds=wsum,
                buffered_batches=self._buf_batches,
                buffered_bytes=self._buf_bytes,
                peak_buffered_batches=self._peak_batches,
                peak_buffered_bytes=self._peak_bytes,
                blocks=self.blocks,
                notes=tuple(self._notes),
                epoch_start_seconds=self._first_block,
                prestarted=self._prestart_lead is not None,
                prestart_lead_seconds=self._prestart_lead,
                collate_actors=self.collate_actors,
                collate_threads=self.collate_threads,
                loader_cpu_ms_per_batch=(
                    self._thread_cpu / self.batches * 1e3 if self.batches else 0.0
                ),
            )
