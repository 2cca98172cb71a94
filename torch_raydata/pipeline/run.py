"""One epoch of the pipeline: stages 2-6 wired together, and the consumer's bookkeeping.

Owns: building the stages for an epoch, the training step's side (wait time per batch,
rows and IDs yielded), and shutting every thread down when the epoch ends, breaks, is
garbage-collected or fails. Ray-free: stage 1's block stream and the fetcher are passed
in, so this runs in unit tests on fake blocks.

    [prefetch thread]   stage 2  blocks in flight (bytes-bounded), in stream order
    [collate workers]   stage 3  batching, under the pool's input lock (sequential)
                        stage 4  collate_fn(batch) on N threads, bounded in flight
    [consumer thread]   stage 5  reorder (only preserve_order=True)
    [finalize thread]   stage 6  transport to the device (inline for LocalTransport)
    [consumer thread]   training step: next() -> batch
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..resume.consumed import ConsumedSet
from ..transports.base import Transport
from .batching import blocks_to_batches
from .errors import ExceptionWrapper
from .finalize import Finalizer
from .prefetch import Fetcher, Prefetcher
from .reorder import restore_order
from .stats import StatsRecorder
from .threaded import iter_threaded
from .types import Batch, SourceBlock

__all__ = ["PipelineConfig", "EpochRun", "EpochProgress"]


class _Collate:
    """Stage 4's per-item function: collate one batch's table."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        # Fast paths of our own collates (DefaultCollate): looked up once, not per batch.
        self.gather = getattr(fn, "gather", None)
        self.collate_spans = getattr(fn, "collate_spans", None)

    def __call__(self, batch: Batch) -> Batch:
        # A failure travels as a value in its batch's place, so stage 5 keeps it in order:
        # with preserve_order every batch before it is delivered, then it raises (stage 6).
        try:
            if batch.rows is not None and self.gather is not None:
                # One copy, no intermediate table; views of the blocks in spans, if known.
                data = self.gather(batch.data, batch.rows, batch.spans)
            elif batch.spans is not None and self.collate_spans is not None:
                data = self.collate_spans(batch.data, batch.spans)  # per-block views
            else:
                data = self.fn(batch.table())
            if data is None:
                raise TypeError(
                    f"collate_fn {self.fn!r} returned None for batch {batch.idx}; "
                    "it must return the collated batch"
                )
        except BaseException as e:  # noqa: BLE001 - re-raised on the consumer
            data = ExceptionWrapper.capture(e, f"stage 4 (collate), batch {batch.idx}")
        # In place (the batch has one owner at a time); dataclasses.replace was 5% of the
        # GIL-held samples of an epoch.
        batch.data, batch.rows, batch.spans = data, None, None
        return batch


class EpochProgress:
    """What the training step has received this epoch. Owned by the dataset, so it
    outlives an EpochRun dropped after a ``break`` (state_dict still needs it)."""

    def __init__(self, epoch: int, batches_skipped: int = 0, record_ids: bool = False) -> None:
        self.epoch = epoch
        self.batches_skipped = batches_skipped  # best-effort resume: counted as consumed
        self.batches_yielded = 0
        self.rows_yielded = 0
        self.exhausted = False  # the epoch ran to its end (not broken out of)
        # Batches in the whole epoch (skipped ones included) when known up front: a consumer
        # that stops at len() never sees the end of the epoch, yet has finished it.
        self.expected_batches: int | None = None
        self.recent_rows: collections.deque[int] = collections.deque(maxlen=16)  # per batch
        self.ids: list[np.ndarray] | None = [] if record_ids else None

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

    def consumed_set(self, lag: int = 0):  # type: ignore[no-untyped-def]
        """A resume.ConsumedSet of the IDs yielded, minus the last ``lag`` batches."""
        out = ConsumedSet()
        ids = self.ids or []
        for keys in ids[: len(ids) - lag] if lag else ids:
            out.add(keys)
        return out


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 256
    num_workers: int = 4
    prefetch_batches: int = 4
    preserve_order: bool = False
    drop_last: bool = False
    shuffle_buffer_size: int | None = None
    shuffle_seed: int | None = None
    id_column: str | None = None

    @property
    def output_buffer_size(self) -> int:
        # Workers each hold one batch in flight; prefetch_batches more may wait collated.
        return self.num_workers + self.prefetch_batches


class EpochRun:
    """Iterator over one epoch's batch payloads (what the training step receives)."""

    def __init__(
        self,
        blocks: Iterable[SourceBlock],
        fetcher: Fetcher,
        collate_fn: Callable[[Any], Any],
        transport: Transport,
        config: PipelineConfig,
        *,
        epoch: int = 0,
        stats: StatsRecorder | None = None,
        skip_batches: int = 0,
        on_close: Callable[[], None] | None = None,
        record_ids: bool = False,
        max_batches: int | None = None,
        drop_keys: Any = None,
        progress: EpochProgress | None = None,
    ) -> None:
        self.config = config
        self.epoch = epoch
        self.stats = stats if stats is not None else StatsRecorder(epoch)
        self.stats.start(time.perf_counter())
        self._transport = transport
        self._skip = skip_batches
        self.progress = (
            progress if progress is not None else EpochProgress(epoch, skip_batches, record_ids)
        )
        # Equal steps across ranks (distributed/sharding.py): exactly this many batches per epoch,
        # counting skipped ones; extra batches are dropped and counted, too few raise.
        self._max_batches = max_batches
        self._pulled = 0
        self._on_close = on_close
        self._closed = False
        self._prefetcher = self._pool = self._final = None
        self._settle = False
        try:
            # Step 2: prefetch blocks on a background thread.
            self._prefetcher = Prefetcher(
                iter(blocks),
                fetcher,
                window_rows=config.prefetch_batches * config.batch_size,
                stats=self.stats,
            )
            # Step 3: batching (runs under the pool's input lock).
            batches = blocks_to_batches(
                self._prefetcher,
                batch_size=config.batch_size,
                drop_last=config.drop_last,
                shuffle_buffer_size=config.shuffle_buffer_size,
                shuffle_seed=config.shuffle_seed,
                epoch=epoch,
                id_column=config.id_column,
                stats=self.stats,
                drop_keys=drop_keys,
            )
            # Step 4: collate on N threads, bounded.
            # Threads must not reference `self` (or dropping the iterator could never stop
            # them): pass a small callable and a bound method of the stats object.
            self._pool = iter_threaded(
                batches,
                _Collate(collate_fn),
                num_workers=config.num_workers,
                output_buffer_size=config.output_buffer_size,
                stage="stage 4 (collate)",
                describe=lambda b: f"batch {b.idx}",
                manual_release=config.preserve_order,
                on_busy=functools.partial(self.stats.add_time, "collate"),
            )
            # Step 5 (optional): restore batch order; its buffer counts against the pool bound.
            upstream: Iterable[Batch] = self._pool
            # Inline finalize and no reorder: the consumer itself pulls from the pool, and
            # frees the batch's slot once it is done with next() (see settle()).
            self._settle = not config.preserve_order and not transport.needs_thread
            if self._settle:
                self._pool.defer_releases()
            if config.preserve_order:
                upstream = restore_order(self._pool, on_emit=self._pool.release, stats=self.stats)
            # Step 6: finalize through the transport.
            self._final = Finalizer(upstream, transport, stats=self.stats)
        except BaseException:
            self.close()
            raise

    # -- consumer ---------------------------------------------------------------------------
    def __iter__(self) -> EpochRun:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        assert self._final is not None
        try:
            while True:
                if self._max_batches is not None and self._pulled >= self._max_batches:
                    self._drop_rest()
                    raise StopIteration
                t0 = time.perf_counter()
                batch = next(self._final)
                now = time.perf_counter()
                self.stats.buffer(-1, -batch.nbytes)
                self._pulled += 1
                if self._skip > 0:  # best-effort resume without id_column: skip ahead
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
            raise
        data = self._transport.on_consume(batch.data)  # on the training step's thread
        self.stats.delivered(batch.num_rows, now - t0, now)
        p = self.progress
        p.batches_yielded += 1
        p.rows_yielded += batch.num_rows
        p.recent_rows.append(batch.num_rows)
        if p.ids is not None and batch.ids is not None:
            p.ids.append(batch.ids)
        self._settle_slot()  # last: the worker this wakes runs during the step
        return data

    def _settle_slot(self) -> None:
        """Free the pool slot of the batch just taken (deferred release, see __init__)."""
        if self._settle and self._pool is not None:
            self._pool.settle()

    @property
    def finished(self) -> bool:
        """Closed (exhausted, broken out of, or failed)."""
        return self._closed

    @property
    def batches_yielded(self) -> int:
        return self.progress.batches_yielded

    @property
    def rows_yielded(self) -> int:
        return self.progress.rows_yielded

    def _drop_rest(self) -> None:
        """``max_batches`` reached: drain the rest of the epoch so its rows are counted
        (and Ray's split sees this shard finish), then close."""
        assert self._final is not None
        rows = 0
        for batch in self._final:
            self._settle_slot()
            self.stats.buffer(-1, -batch.nbytes)
            rows += batch.num_rows
        if rows:
            self.stats.add_dropped(
                rows, f"max_batches={self._max_batches} (equal steps across ranks)"
            )
        self.close()

    def consumed_ids(self) -> np.ndarray:
        """IDs of every row yielded to the training step so far this epoch."""
        if not self.progress.ids:
            return np.empty(0, dtype=np.uint64)
        return np.concatenate(self.progress.ids)

    def close(self) -> None:
        """Stop every stage, then join them (downstream first), then release stage 1."""
        if self._closed:
            return
        self._closed = True
        stages = [s for s in (self._final, self._pool, self._prefetcher) if s is not None]
        for s in stages:
            s.stop()
        for s in stages:
            if s is self._prefetcher and self._on_close is not None:
                # Release stage 1 before joining the prefetch thread: shutting Ray's
                # executor down unblocks a thread waiting on it for the next block.
                self._on_close()
            s.close()
        if self._prefetcher is None and self._on_close is not None:
            self._on_close()
        # A closed run may be kept alive (by the caller, or by the frames of a traceback it
        # raised): it must not keep the stages, stage 1's executor or their blocks.
        self._prefetcher = self._pool = self._final = self._on_close = None
        self.stats.finish(time.perf_counter())
        self.stats.clear_buffered()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from __del__
            pass
