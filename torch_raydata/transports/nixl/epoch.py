"""The remote epoch: format/collate in Ray actors next to the data, READs into the trainer.

Used instead of :class:`~torch_raydata.pipeline.run.EpochRun` when the transport collates
remotely (``transports.base.RemoteCollate``: :class:`~torch_raydata.transports.nixl.NixlTransport`).
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
is local). They start with each epoch (a fresh process importing torch: the first batch
comes seconds later; see benchmarks/NOTES_nixl.md).

Cleanup: closing (end, break, error, GC) stops both threads, shuts the source down, kills
every collate actor and disconnects the transport from their agents; no actor, block or
descriptor reference outlives the iterator. An actor that dies mid-epoch surfaces as
:class:`RemoteCollateError` naming the batch (its pending calls fail at once), or as
``NixlTransferError`` naming the batch when a READ from its memory fails (or has not
completed after ``transport.xfer_timeout`` seconds).
"""

from __future__ import annotations

import itertools
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...pipeline.constants import JOIN_TIMEOUT, QUEUE_TIMEOUT
from ...pipeline.consumer import EpochConsumer, EpochProgress
from ...pipeline.errors import ExceptionWrapper
from ...pipeline.queues import Inbox, Slots
from ...pipeline.run import PipelineConfig
from ...pipeline.stats import StatsRecorder
from ...pipeline.types import Batch, SourceBlock
from ..base import RemoteCollate
from .plan import BatchPlan, kept_rows, plan_batches

__all__ = ["RemoteEpochRun", "RemoteCollateError"]

_END = object()
_SETTLE_TIMEOUT = 2.0  # close(): how long to wait for the killed actors' calls to resolve


class RemoteCollateError(RuntimeError):
    """A collate actor died (or could not start) while a batch was assigned to it."""


# -- threads --------------------------------------------------------------------------------
@dataclass(eq=False)
class _Submitted:
    plan: BatchPlan
    ref: Any  # ObjectRef of the RemoteBatch descriptor
    actor: int


class _Shared:
    """What the plan and fetch threads share. Holds no reference to the epoch object, so
    dropping the iterator reaches ``EpochConsumer.__del__`` and stops them."""

    def __init__(self, bound: int, num_actors: int) -> None:
        self.stop = threading.Event()
        self.slots = Slots(bound)
        self.cond = threading.Condition()  # guards submitted, load, planner_done, error
        self.submitted: deque[_Submitted] = deque()
        self.load = [0] * num_actors  # descriptors outstanding per actor
        self.planner_done = False
        self.error: ExceptionWrapper | None = None
        self.out: queue.SimpleQueue[Any] = queue.SimpleQueue()


def _plan_loop(s: _Shared, plans: Iterator[BatchPlan], actors: list[Any]) -> None:
    """Stages 1 and 3, then submit: one plan per slot, to the least-loaded actor."""
    try:
        for plan in plans:
            while not s.slots.acquire(timeout=QUEUE_TIMEOUT):
                if s.stop.is_set():
                    return
            if s.stop.is_set():
                return
            with s.cond:
                i = min(range(len(actors)), key=s.load.__getitem__)
                s.load[i] += 1
            ref = actors[i].collate.remote(plan)
            with s.cond:
                s.submitted.append(_Submitted(plan, ref, i))
                s.cond.notify_all()
            del plan, ref
    except BaseException as e:  # noqa: BLE001 - forwarded to the consumer, after earlier batches
        if not s.stop.is_set():
            s.error = ExceptionWrapper.capture(
                e, "stages 1-3 (source, planning) of the remote epoch"
            )
    finally:
        with s.cond:
            s.planner_done = True
            s.cond.notify_all()


def _resolve(s: _Shared, item: _Submitted, names: list[str]) -> Any:
    """The descriptor of ``item``; a dead actor or a failed collate raise, naming the batch."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(item.ref)
    except RayActorError as e:
        text = str(e)
        causes = [
            ln.strip() for ln in text.splitlines() if re.match(r"\s*\w+(Error|Exception): ", ln)
        ]
        cause = (causes[-1] if causes else text.strip().splitlines()[0])[:300]
        what = "could not start" if "creation task" in text else "died"
        raise RemoteCollateError(
            f"collate actor {names[item.actor]} {what} while batch {item.plan.idx} was "
            f"assigned to it; the epoch cannot complete ({cause})"
        ) from e
    except RayTaskError as e:
        raise e.as_instanceof_cause() from None  # the collate_fn's own exception type
    finally:
        with s.cond:
            s.load[item.actor] -= 1


def _fetch_loop(
    s: _Shared,
    transport: Any,
    names: list[str],
    preserve_order: bool,
    stats: StatsRecorder,
) -> None:
    """Stages 5 and 6: groups of ready descriptors -> one READ each, posted together."""
    import ray

    k = transport.in_flight
    where = "the remote epoch"
    try:
        while not s.stop.is_set():
            # Step 5: the next group (full, unless no more plans can come).
            with s.cond:
                while not (s.stop.is_set() or s.planner_done or len(s.submitted) >= k):
                    s.cond.wait(QUEUE_TIMEOUT)
                if s.stop.is_set():
                    return
                if not s.submitted:
                    if s.error is not None:
                        s.out.put(s.error)
                    return
                pool = itertools.islice(s.submitted, k) if preserve_order else s.submitted
                candidates = list(pool)
            need = min(k, len(candidates))
            ready, _ = ray.wait(
                [c.ref for c in candidates], num_returns=need, timeout=QUEUE_TIMEOUT
            )
            if len(ready) < need:
                continue  # re-check stop; a later group may complete first (unordered)
            ready_set = set(ready)
            group = [c for c in candidates if c.ref in ready_set][:need]
            with s.cond:
                for c in group:
                    s.submitted.remove(c)
            descs, failed = [], None
            for c in group:  # every one, so no failed result goes unretrieved (Ray logs those)
                try:
                    descs.append(_resolve(s, c, names))
                except BaseException as e:  # noqa: BLE001 - the first failure is raised below
                    failed = failed or (c, e)
                else:
                    stats.add_time("collate", descs[-1].seconds)
            if failed is not None:
                c, err = failed
                where = f"stage 4 (remote collate on {names[c.actor]}), batch {c.plan.idx}"
                raise err
            # Step 6: post one READ per batch, all of them, then wait for all.
            where = f"stage 6 (finalize, NIXL READ), batches {[c.plan.idx for c in group]}"
            t0 = time.perf_counter()
            request = transport.fetch_multiple(descs)
            while True:
                try:
                    payloads = transport.wait_fetch_complete(request, timeout=QUEUE_TIMEOUT)
                    break
                except TimeoutError:
                    if s.stop.is_set():
                        transport.abort(request)
                        return
            stats.add_time("finalize", time.perf_counter() - t0)
            for c, d, data in zip(group, descs, payloads, strict=True):
                p = c.plan
                s.out.put(
                    Batch(idx=p.idx, data=data, num_rows=p.num_rows, nbytes=p.nbytes, ids=d.ids)
                )
            del group, descs, payloads, candidates, ready, ready_set, request
    except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
        if not s.stop.is_set():
            s.out.put(ExceptionWrapper.capture(e, where))
    finally:
        s.out.put(_END)


class _Thread:
    """A named daemon thread over ``_Shared`` with a stage's stop/close protocol."""

    def __init__(self, s: _Shared, name: str, target: Callable[..., None], *args: Any) -> None:
        self._s = s
        self._thread = threading.Thread(target=target, args=(s, *args), name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._s.stop.set()
        with self._s.cond:
            self._s.cond.notify_all()

    def close(self) -> None:
        self.stop()
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)


class _Output(_Thread):
    """The fetch thread and the consumer's end of its output queue (the chain's last stage)."""

    def __init__(self, s: _Shared, *args: Any) -> None:
        super().__init__(s, "trd-remote-fetch", _fetch_loop, *args)
        self._inbox = Inbox(s.out, s.stop, _END)

    def __iter__(self) -> _Output:
        return self

    def __next__(self) -> Batch:
        s = self._s
        item = self._inbox.next()
        s.slots.release()
        return item

    def close(self) -> None:
        super().close()
        while True:  # batches nobody will take: their buffers go back to the pool
            try:
                self._s.out.get_nowait()
            except queue.Empty:
                break


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
            on_consume=transport.on_consume,  # type: ignore[attr-defined]
        )
        self.config = config
        self._transport = transport
        self._on_close = on_close
        self._actors: list[tuple[Any, str]] = []
        self._shared: _Shared | None = None
        self._planner: _Thread | None = None
        self._output: _Output | None = None
        try:
            bound = config.prefetch_batches + transport.in_flight
            self._actors = transport.acquire_workers(
                collate_fn, id_column=config.id_column, max_slabs=bound + 2
            )
            handles = [a for a, _ in self._actors]
            names = [n for _, n in self._actors]
            s = self._shared = _Shared(bound, len(handles))
            keep_rows = None
            if drop_keys is not None and config.id_column is not None:
                keep_rows = _kept_rows_remotely(drop_keys, config.id_column)
            plans = plan_batches(
                blocks,
                batch_size=config.batch_size,
                drop_last=config.drop_last,
                shuffle_buffer_size=config.shuffle_buffer_size,
                shuffle_seed=config.shuffle_seed,
                epoch=epoch,
                stats=self.stats,
                keep_rows=keep_rows,
            )
            # Steps 1-3 (plan thread) and 5-6 (fetch thread); see the module docstring.
            self._planner = _Thread(s, "trd-remote-plan", _plan_loop, plans, handles)
            self._output = _Output(s, transport, names, config.preserve_order, self.stats)
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
        if self._shared is not None:  # drop block and descriptor references now
            with self._shared.cond:
                refs = [c.ref for c in self._shared.submitted]
                self._shared.submitted.clear()
            self._shared = None
        actors, self._actors = self._actors, []
        self._transport.release_workers(actors, reusable=False)
        _settle(refs)


def _kept_rows_remotely(consumed: Any, id_column: str) -> Callable[[SourceBlock], np.ndarray]:
    """``keep_rows`` for plan_batches: a zero-CPU Ray task per block next to it (the ID
    set goes into the object store once per epoch)."""
    import ray

    from ...resume import ConsumedSet, SharedConsumedSet

    if not isinstance(consumed, ConsumedSet):
        consumed = ConsumedSet(consumed)  # a BitMap64 from the dataset's resume plan
    shared = SharedConsumedSet.put(consumed)
    task = ray.remote(num_cpus=0)(kept_rows)

    def keep(sb: SourceBlock) -> np.ndarray:
        return ray.get(task.remote(sb.ref, sb.rows, shared, id_column))

    return keep


def _settle(refs: list[Any]) -> None:
    """Retrieve (and drop) the results of calls to the killed actors, so Ray does not log a
    failed one as an unhandled error (from a thread of its own) when its reference goes.
    Calls still queued fail at once once the kill lands; the wait is bounded anyway."""
    import ray

    if not refs:
        return
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_SETTLE_TIMEOUT)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - the epoch is over; its error (if any) was raised
            pass
