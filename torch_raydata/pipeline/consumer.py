"""The training step's side of one epoch: what every epoch does with its finalized batches.

Owns: handing each batch to the training step (``on_consume`` on its thread), the wait
per batch, the rows, batches and row IDs yielded (:class:`EpochProgress`), skip-ahead
(best-effort resume), the equal-steps cap (``max_batches``), and closing exactly once, on
the end, a ``break`` (close or GC) or an error: the stages first, then the stats.

Does not own the stages: an epoch builds its chain of stages (``run.EpochRun`` locally,
``transports/nixl/epoch.py`` with remote collate), sets the chain's last iterator as
``_batches`` and overrides :meth:`EpochConsumer._shutdown` to stop them. Ray-free.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..resume.consumed import RECENT_BATCHES, ConsumedSet
from .stats import StatsRecorder
from .types import Batch

__all__ = ["EpochConsumer", "EpochProgress"]


class EpochProgress:
    """What the training step has received this epoch. Owned by the dataset, so it
    outlives an epoch dropped after a ``break`` (state_dict still needs it)."""

    def __init__(self, epoch: int, batches_skipped: int = 0, record_ids: bool = False) -> None:
        self.epoch = epoch
        self.batches_skipped = batches_skipped  # best-effort resume: counted as consumed
        self.batches_yielded = 0
        self.rows_yielded = 0
        self.exhausted = False  # the epoch ran to its end (not broken out of)
        # Batches in the whole epoch (skipped ones included) when known up front: a consumer
        # that stops at len() never sees the end of the epoch, yet has finished it.
        self.expected_batches: int | None = None
        self.recent_rows: collections.deque[int] = collections.deque(
            maxlen=RECENT_BATCHES
        )  # rows per batch
        # Exact resume: the IDs yielded, compressed as they come by the set's own thread
        # (joined when the epoch closes); no per-ID buffer lives for the epoch.
        self.consumed: ConsumedSet | None = ConsumedSet.recording() if record_ids else None

    def finished(self, lag: int = 0) -> bool:
        """Every batch of the epoch reached the training step (minus the last ``lag``)."""
        consumed = self.batches_skipped + max(0, self.batches_yielded - lag)
        if self.exhausted:
            return consumed >= self.batches_skipped + self.batches_yielded
        return self.expected_batches is not None and consumed >= self.expected_batches

    def rows_consumed(self, lag: int = 0) -> int:
        """Rows yielded, minus those of the last ``lag`` batches (``lag`` <= 16)."""
        held = list(self.recent_rows)[len(self.recent_rows) - lag :] if lag else []
        return self.rows_yielded - sum(held)

    def close(self) -> None:
        """The epoch is over: join the consumed set's thread (the set stays readable)."""
        if self.consumed is not None:
            self.consumed.close()


def _same(data: Any) -> Any:
    return data


class EpochConsumer:
    """Iterator over one epoch's batch payloads (what the training step receives).

    Args:
        epoch: the epoch number (stats, progress, error messages).
        stats: the epoch's recorder (a new one if None); its clock starts here.
        skip_batches: batches to pull and drop first (best-effort resume).
        record_ids: keep the row IDs of every batch yielded (exact resume).
        max_batches: exactly this many batches per epoch, skipped ones included (equal
            steps across ranks, ``distributed/sharding.py``): extra batches are dropped and
            counted, too few raise.
        progress: the dataset's record of this epoch (a new one if None).
        on_consume: called with each payload on the training step's thread just before it
            receives it (``Transport.on_consume``).
    """

    def __init__(
        self,
        *,
        epoch: int = 0,
        stats: StatsRecorder | None = None,
        skip_batches: int = 0,
        record_ids: bool = False,
        max_batches: int | None = None,
        progress: EpochProgress | None = None,
        on_consume: Callable[[Any], Any] | None = None,
    ) -> None:
        self.epoch = epoch
        self.stats = stats if stats is not None else StatsRecorder(epoch)
        self.stats.start(time.perf_counter())
        self.progress = (
            progress if progress is not None else EpochProgress(epoch, skip_batches, record_ids)
        )
        self._skip = skip_batches
        self._max_batches = max_batches
        self._pulled = 0
        self._on_consume = on_consume if on_consume is not None else _same
        self._closed = False
        self._superseded = False  # closed by another iter() of the dataset: next() raises
        # Called (after close) when the epoch fails: the dataset drops a prestarted next
        # epoch then, rather than holding cluster resources for a run that is failing.
        self.on_error: Callable[[], None] | None = None
        # The last stage's output, set by the epoch once its stages are built.
        self._batches: Iterator[Batch] | None = None

    # -- hooks for the epoch ----------------------------------------------------------------
    def _shutdown(self) -> None:
        """Stop and join the epoch's stages and release its source (once, from close())."""

    def _settle_slot(self) -> None:
        """The batch just taken has left the stages (EpochRun frees its pool slot here)."""

    # -- consumer ---------------------------------------------------------------------------
    def __iter__(self) -> EpochConsumer:
        return self

    def __next__(self) -> Any:
        if self._closed:
            if self._superseded:
                raise RuntimeError(
                    f"epoch {self.epoch} was stopped after {self.progress.batches_yielded} "
                    "batches because iter() was called again on the same RayIterableDataset "
                    "while it ran (a nested loop: a quick eval, a peek): one epoch runs at a "
                    "time per dataset, and continuing would silently skip the rest of this "
                    "one. Use a second RayIterableDataset for the inner pass, or finish (or "
                    "close()) this epoch first"
                )
            raise StopIteration
        assert self._batches is not None
        try:
            while True:
                if self._max_batches is not None and self._pulled >= self._max_batches:
                    self._drop_rest()
                    raise StopIteration
                t0 = time.perf_counter()
                batch = next(self._batches)
                now = time.perf_counter()
                self._pulled += 1
                if self._skip > 0:  # best-effort resume without id_column: skip ahead
                    self.stats.buffer(-1, -batch.nbytes)
                    self._skip -= 1
                    self._settle_slot()
                    continue
                break
        except StopIteration:
            short = self._max_batches is not None and self._pulled < self._max_batches
            self.progress.exhausted = not short
            self.close()
            if short:
                raise RuntimeError(
                    f"this rank's data ended after {self._pulled} batches in epoch "
                    f"{self.epoch}, but max_batches={self._max_batches} (every rank must run "
                    "the same number of steps, or DDP hangs): the row count given or known "
                    "for the dataset (num_rows) is larger than what this rank received"
                ) from None
            raise
        except BaseException:
            self.close()
            if self.on_error is not None:
                self.on_error()
            raise
        data = self._on_consume(batch.data)  # on the training step's thread
        # One stats call (one lock) per batch on this thread: it also takes the batch off
        # the buffered books.
        self.stats.delivered(batch.num_rows, now - t0, now, nbytes=batch.nbytes)
        p = self.progress
        p.batches_yielded += 1
        p.rows_yielded += batch.num_rows
        p.recent_rows.append(batch.num_rows)
        if p.consumed is not None and batch.ids is not None:
            p.consumed.add(batch.ids)
        self._settle_slot()  # last: the worker this wakes runs during the step
        return data

    @property
    def closed(self) -> bool:
        """Closed (exhausted, broken out of, or failed). Not to be confused with
        ``EpochProgress.finished()``: every batch reached the training step."""
        return self._closed

    @property
    def batches_yielded(self) -> int:
        return self.progress.batches_yielded

    @property
    def rows_yielded(self) -> int:
        return self.progress.rows_yielded

    def consumed_ids(self) -> np.ndarray:
        """Keys (uint64, ascending) of every row yielded to the training step so far
        this epoch."""
        if self.progress.consumed is None:
            return np.empty(0, dtype=np.uint64)
        return self.progress.consumed.sorted_keys()

    def _drop_rest(self) -> None:
        """``max_batches`` reached: drain the rest of the epoch so its rows are counted
        (and Ray's split sees this shard finish), then close."""
        assert self._batches is not None
        rows = 0
        for batch in self._batches:
            self._settle_slot()
            self.stats.buffer(-1, -batch.nbytes)
            rows += batch.num_rows
        if rows:
            self.stats.add_dropped(
                rows, f"max_batches={self._max_batches} (equal steps across ranks)"
            )
        self.close()

    def supersede(self) -> None:
        """Another ``iter()`` of the dataset took over: close, and make any later ``next()``
        raise (rather than end the epoch early without a word)."""
        if not self._closed:
            self._superseded = True
        self.close()

    def close(self) -> None:
        """Stop the stages (``_shutdown``), then finish the stats. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # A closed epoch may be kept alive (by the caller, or by the frames of a traceback
        # it raised): it must not keep the stages, stage 1's executor or their blocks.
        self._batches = None
        self._shutdown()
        self.progress.close()
        self.stats.finish(time.perf_counter())
        self.stats.clear_buffered()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from __del__
            pass
