"""One epoch of the pipeline: stages 2-6 wired together.

Owns: building the stages for an epoch and shutting every thread down when the epoch
ends, breaks, is garbage-collected or fails. The training step's side (wait time per
batch, rows and IDs yielded, skip-ahead, ``max_batches``) is ``consumer.py``'s.
Ray-free: stage 1's block stream and the fetcher are passed in, so this runs in unit
tests on fake blocks.

    [prefetch thread]   stage 2  blocks in flight (bytes-bounded), in stream order
    [collate workers]   stage 3  batching, under the pool's input lock (sequential)
                        stage 4  collate_fn(batch) on N threads, bounded in flight
    [consumer thread]   stage 5  reorder (only preserve_order=True)
    [finalize thread]   stage 6  transport to the device (inline for LocalTransport)
    [consumer thread]   training step: next() -> batch
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .batching import blocks_to_batches
from .consumer import EpochConsumer, EpochProgress
from .errors import ExceptionWrapper
from .finalize import Finalizer
from .prefetch import Fetcher, Prefetcher
from .reorder import restore_order
from .stats import StatsRecorder
from .threaded import iter_threaded
from .transport import Transport
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


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 256
    num_workers: int = 4
    prefetch_batches: int = 4
    #: Start one collate thread and add more (up to ``num_workers``) only while the
    #: training step waits on collate (threaded.py, "Growing").
    grow_workers: bool = False
    preserve_order: bool = False
    drop_last: bool = False
    shuffle_buffer_size: int | None = None
    shuffle_seed: int | None = None
    id_column: str | None = None

    @property
    def output_buffer_size(self) -> int:
        # Workers each hold one batch in flight; prefetch_batches more may wait collated.
        return self.num_workers + self.prefetch_batches


class EpochRun(EpochConsumer):
    """One local epoch: stages 2-6 over stage 1's block stream, consumed by the training
    step through :class:`~torch_raydata.pipeline.consumer.EpochConsumer` (which owns the
    counting, IDs, skip-ahead, ``max_batches`` and closing)."""

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
        super().__init__(
            epoch=epoch,
            stats=stats,
            skip_batches=skip_batches,
            record_ids=record_ids,
            max_batches=max_batches,
            progress=progress,
            on_consume=transport.on_consume,
        )
        self.config = config
        self._on_close = on_close
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
                initial_workers=1 if config.grow_workers else None,
                on_grow=self.stats.set_collate_threads,
                on_thread_cpu=self.stats.add_thread_cpu,
            )
            self.stats.set_collate_threads(1 if config.grow_workers else config.num_workers)
            # Step 5 (optional): restore batch order; its buffer counts against the pool bound.
            upstream: Iterable[Batch] = self._pool
            # Inline finalize and no reorder: the consumer itself pulls from the pool, and
            # frees the batch's slot once it is done with next() (see _settle_slot()).
            self._settle = not config.preserve_order and not transport.needs_thread
            if self._settle:
                self._pool.defer_releases()
            if config.preserve_order:
                upstream = restore_order(self._pool, on_emit=self._pool.release, stats=self.stats)
            # Step 6: finalize through the transport; the consumer pulls from it.
            self._final = self._batches = Finalizer(upstream, transport, stats=self.stats)
        except BaseException:
            self.close()
            raise

    def _settle_slot(self) -> None:
        """Free the pool slot of the batch just taken (deferred release, see __init__)."""
        if self._settle and self._pool is not None:
            self._pool.settle()

    def _shutdown(self) -> None:
        """Stop every stage, then join them (downstream first), then release stage 1."""
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
        self._prefetcher = self._pool = self._final = self._on_close = None
