"""The remote epoch: format/collate in Ray actors next to the data, READs into the trainer.

Used instead of :class:`~torch_raydata.pipeline.run.EpochRun` when the transport collates
remotely (``pipeline.transport.RemoteCollate``: :class:`~torch_raydata.transports.nixl.NixlTransport`).
The trainer process then never resolves a block and never runs the collate_fn: that CPU
work moves to a small pool of collate actors (Ray #50128, #63910). The consumer's side is
the local epoch's (``pipeline.consumer.EpochConsumer``: skip-ahead, ``max_batches``, row
IDs, stats, close on break/GC); only the chain of stages differs.

    [plan thread]     stage 1  block refs + row counts from the source (metadata only)
                      stage 3  plan each batch: (block ref, start, stop) pieces cut from the
                               row counts, or with a shuffle buffer the local path's seeded
                               draw, as row positions; submit it to the least-loaded actor
    [collate actors]  stage 2  ray.get the pieces (zero-copy from their node's object store)
                      stage 4  slice/gather, collate into NIXL-registered memory, return a
                               small RemoteBatch descriptor (``worker.py``)
    [fetch thread]    stage 5  wait until a group of ``transport.in_flight`` descriptors is
                               ready: the next ones in batch order with preserve_order=True,
                               else the first ready
                      stage 6  ``transport.fetch_multiple(group)`` posts one READ per batch
                               at once; ``wait_fetch_complete`` waits for all of them
    [consumer]        next() -> batch

Bound (the semaphore ``slots``, initial ``prefetch_batches + in_flight``): the plan thread
acquires a slot before submitting a plan, the consumer releases it when it takes the batch:
    plans at actors + descriptors waiting + READs posted + batches queued <= bound
so each actor has at most ``bound`` source buffers busy and the trainer as many
destination buffers in flight. The fetch thread waits for a full group only while more
plans can come, and the bound is at least one group, so it cannot deadlock.

Supported on this path: preserve_order, drop_last, shuffle_buffer_size/shuffle_seed (the
same batches as the local path for the same block order: the draw is replayed on row
positions), id_column, skip-ahead and exact resume, equal steps across ranks
(max_batches), Dataset and DataIterator (shard) inputs, any picklable collate_fn. Exact
resume where the local path drops consumed rows in stage 3 (DataIterator or materialized
inputs): a zero-CPU Ray task per block reads its ID column and returns the kept rows,
which the plans gather. ``num_workers`` (threads of the local collate pool) is not used:
``transport.num_actors`` actors collate. Not supported: blocks whose metadata has no row
count (ValueError: use transport='local').
Actors are placed by Ray's default scheduling (no locality hints; on one node everything
is local). The transport starts them for the first epoch and lends the same ones to the
next epochs (``actors.py``: starting one takes seconds, a fresh process importing torch);
each epoch tags its calls with a new generation, so an actor frees what an earlier,
closed epoch left busy (``worker.py``).

Cleanup: closing (end, break, error, GC) stops both threads (the fetch thread completes
or aborts its posted READs), shuts the source down and hands the actors back to the
transport: kept for the next epoch, or killed (and their agents forgotten) when a thread
failed. No block or descriptor reference outlives the iterator; the actors die with the
transport (its close, or its garbage collection). An actor that dies mid-epoch surfaces as
:class:`RemoteCollateError` naming the batch (its pending calls fail at once), or as
``NixlTransferError`` naming the batch when a READ from its memory fails (or has not
completed after ``transport.xfer_timeout`` seconds).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ...pipeline.consumer import EpochConsumer, EpochProgress
from ...pipeline.run import PipelineConfig
from ...pipeline.stats import StatsRecorder
from ...pipeline.transport import RemoteCollate
from ...pipeline.types import SourceBlock
from ...resume.consumed import ConsumedSet
from ...resume.filter import SharedConsumedSet
from .plan import kept_rows, plan_batches
from .threads import (
    Chunker,
    Output,
    RemoteCollateError,
    Shared,
    StageThread,
    before_each,
    plan_loop,
)

__all__ = ["RemoteEpochRun", "RemoteCollateError"]

_SETTLE_TIMEOUT = 2.0  # close(): how long to wait for the killed actors' calls to resolve
_GENERATIONS = itertools.count(1)  # one per epoch, increasing (a reused actor's epochs)


class RemoteEpochRun(EpochConsumer):
    """One epoch with collate in Ray actors; see the module docstring.

    Same arguments as :class:`~torch_raydata.pipeline.run.EpochRun`; ``fetcher`` is
    unused (the actors resolve the blocks) and ``transport`` must be a ``RemoteCollate``
    (NixlTransport). The consumer's side (counting, IDs, skip-ahead, ``max_batches``,
    closing) is :class:`~torch_raydata.pipeline.consumer.EpochConsumer`'s.
    """

    def __init__(
        self,
        blocks: Iterable[SourceBlock],
        fetcher: Any,
        collate_fn: Callable[[Any], Any],
        transport: RemoteCollate,
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
        if not isinstance(transport, RemoteCollate):
            raise TypeError(f"{transport!r} does not collate remotely; use EpochRun")
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
        self._transport = transport
        self._on_close = on_close
        self._actors: list[tuple[Any, str]] = []
        self._shared: Shared | None = None
        self._planner: StageThread | None = None
        self._output: Output | None = None
        try:
            bound = config.prefetch_batches + transport.in_flight
            self._actors = transport.acquire_workers(
                collate_fn, id_column=config.id_column, max_slabs=bound + 2
            )
            handles = [a for a, _ in self._actors]
            names = [n for _, n in self._actors]
            self.stats.collate_actors = len(handles)
            s = self._shared = Shared(bound, len(handles))
            keep_rows = None
            if drop_keys is not None and config.id_column is not None:
                keep_rows = _kept_rows_remotely(drop_keys, config.id_column)
            generation = next(_GENERATIONS)  # tags this epoch's calls (worker.py: _begin)
            chunker = Chunker(
                s,
                handles,
                generation,
                getattr(transport, "chunk", 1),
                ready=getattr(blocks, "ready", None),  # EpochBlocks.ready: pulls that won't wait
            )
            plans = plan_batches(
                before_each(blocks, chunker.before_pull),
                batch_size=config.batch_size,
                drop_last=config.drop_last,
                shuffle_buffer_size=config.shuffle_buffer_size,
                shuffle_seed=config.shuffle_seed,
                epoch=epoch,
                stats=self.stats,
                keep_rows=keep_rows,
            )
            # Steps 1-3 (plan thread) and 5-6 (fetch thread); see the module docstring.
            cpu = self.stats.add_thread_cpu
            self._planner = StageThread(s, "trd-remote-plan", plan_loop, plans, chunker, on_cpu=cpu)
            self._output = Output(
                s, transport, names, config.preserve_order, self.stats, on_cpu=cpu
            )
            self._batches = self._output
        except BaseException:
            self.close()
            raise

    @property
    def actors(self) -> list[Any]:
        """Handles of this epoch's collate actors (handed back when the epoch closes)."""
        return [a for a, _ in self._actors]

    def _shutdown(self) -> None:
        """Stop both threads, join them (fetch first), release stage 1 before joining the
        plan thread (it may wait on the source), then hand the actors back."""
        threads = [t for t in (self._output, self._planner) if t is not None]
        for t in threads:
            t.stop()
        for t in threads:
            if t is self._planner and self._on_close is not None:
                self._on_close()
            t.close()
        if self._planner is None and self._on_close is not None:
            self._on_close()
        self._output = self._planner = self._on_close = None
        refs: list[Any] = []
        reusable = self._shared is not None and not self._shared.failed
        if self._shared is not None:  # drop block and descriptor references now
            with self._shared.cond:
                # A chunk's plans share one ref (ray.wait refuses duplicates).
                refs = list(dict.fromkeys(c.ref for c in self._shared.submitted))
                self._shared.submitted.clear()
            self._shared = None
        # Kept for the next epoch unless a thread failed (a dead actor, a failed collate or
        # READ): then killed. The READs were completed or aborted by the fetch thread; the
        # slabs of batches never READ are freed by the actor at the next epoch's first call.
        actors, self._actors = self._actors, []
        if actors:
            self._transport.release_workers(actors, reusable=reusable)
        _settle(refs, _SETTLE_TIMEOUT if not reusable else 0.0)


def _kept_rows_remotely(consumed: Any, id_column: str) -> Callable[[SourceBlock], np.ndarray]:
    """``keep_rows`` for plan_batches: a zero-CPU Ray task per block next to it (the ID
    set goes into the object store once per epoch)."""
    import ray

    if not isinstance(consumed, ConsumedSet):
        consumed = ConsumedSet(consumed)  # a BitMap64 from the dataset's resume plan
    shared = SharedConsumedSet.put(consumed)
    task = ray.remote(num_cpus=0)(kept_rows)

    def keep(sb: SourceBlock) -> np.ndarray:
        return ray.get(task.remote(sb.ref, sb.rows, shared, id_column))

    return keep


def _settle(refs: list[Any], timeout: float) -> None:
    """Retrieve (and drop) the results of the epoch's unfinished calls, so Ray does not log
    a failed one as an unhandled error (from a thread of its own) when its reference goes.
    A killed actor's calls fail at once once the kill lands (wait up to ``timeout``); a
    kept actor's are left to finish (``timeout`` 0: only those already done)."""
    import ray

    if not refs:
        return
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - the epoch is over; its error (if any) was raised
            pass
