"""The remote epoch: format/collate in Ray actors next to the data, READs into the trainer.

Used instead of :class:`~torch_raydata.pipeline.run.EpochRun` when the transport asks for
it (``transport.remote_collate``: :class:`~torch_raydata.transports.nixl.NixlTransport`).
The trainer process then never resolves a block and never runs the collate_fn: that CPU
work moves to a small pool of collate actors (Ray #50128, #63910). Same consumer contract
as EpochRun (a subclass: skip-ahead, ``max_batches``, row IDs, stats, close on break/GC).

    [plan thread]     stage 1  block refs + row counts from the source (metadata only)
                      stage 3  plan each batch: (block ref, start, stop) pieces cut from the
                               row counts, or with a shuffle buffer the local path's seeded
                               draw, as row positions; submit it to the least-loaded actor
    [collate actors]  stage 2  ray.get the pieces (zero-copy from their node's object store)
                      stage 4  slice/gather, collate into NIXL-registered memory, return a
                               small RemoteBatch descriptor (``transports/_nixl_worker.py``)
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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from ..kernels.ids import check_column, column_ids, consumed_mask, ids_as_uint64
from ..kernels.take import take_rows
from ..resume.consumed import ConsumedSet
from ..resume.filter import SharedConsumedSet
from ..transports.base import Transport
from .batching import to_arrow
from .constants import JOIN_TIMEOUT, QUEUE_TIMEOUT
from .errors import ExceptionWrapper
from .queues import Inbox, Slots, drain
from .run import EpochRun, PipelineConfig
from .stats import StatsRecorder
from .types import Batch, SourceBlock

__all__ = ["BatchPlan", "RemoteEpochRun", "RemoteCollateError", "plan_batches"]

_END = object()
_SETTLE_TIMEOUT = 2.0  # close(): how long to wait for the killed actors' calls to resolve


class RemoteCollateError(RuntimeError):
    """A collate actor died (or could not start) while a batch was assigned to it."""


# -- stage 3: plans -----------------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """One batch as row coordinates: ``concat(refs[i][start:stop] for i, start, stop in
    pieces)``, then ``take`` (row positions in that concatenation, in batch order) when
    shuffled. ``nbytes`` is estimated from block metadata (stats)."""

    idx: int
    refs: tuple[Any, ...]
    pieces: tuple[tuple[int, int, int], ...]
    num_rows: int
    nbytes: int
    take: np.ndarray | None = None

    def materialize(
        self, id_column: str | None = None, get: Callable[[list[Any]], list[Any]] | None = None
    ) -> tuple[pa.Table, np.ndarray | None]:
        """The batch's table (and its ``id_column`` values). Runs in the collate actor;
        ``get`` resolves the refs (default ``ray.get``; tests pass a dict lookup)."""
        if get is None:
            import ray

            get = ray.get
        tables = [to_arrow(b) for b in get(list(self.refs))]
        parts = [tables[i].slice(start, stop - start) for i, start, stop in self.pieces]
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)  # zero-copy
        if self.take is not None:
            table = take_rows(table, self.take)  # the shuffle's gather (one copy)
        ids = None
        if id_column is not None:
            ids = column_ids(table, id_column)
        return table, ids


@dataclass
class _Block:
    ref: Any
    base: int  # first row of this stream's slice of the block
    rows: int  # rows planned from it (kept rows when resuming)
    row_bytes: float
    live: int  # rows not yet planned (shuffle); the ref is dropped at 0
    keep: np.ndarray | None = None  # resuming: offsets (in the slice) of the kept rows


def _blocks(
    blocks: Iterable[SourceBlock],
    stats: StatsRecorder,
    keep_rows: Callable[[SourceBlock], np.ndarray] | None,
) -> Iterator[_Block]:
    it = iter(blocks)
    while True:
        t0 = time.perf_counter()
        try:
            sb = next(it)
        except StopIteration:
            return
        finally:
            stats.add_time("source", time.perf_counter() - t0)
        stats.add_block()
        if sb.num_rows is None:
            raise ValueError(
                "a block's metadata has no row count; transport='nixl' plans batches from "
                "row counts without fetching blocks: use transport='local' for this dataset"
            )
        if not sb.num_rows:
            continue
        keep = None
        if keep_rows is not None:
            t0 = time.perf_counter()
            keep = np.asarray(keep_rows(sb), dtype=np.int64)
            stats.add_time("batching", time.perf_counter() - t0)
            if len(keep) == sb.num_rows:
                keep = None
        rows = sb.num_rows if keep is None else len(keep)
        if rows:
            base = sb.rows[0] if sb.rows is not None else 0
            yield _Block(sb.ref, base, rows, sb.size_bytes / sb.num_rows, rows, keep)


def _plan(idx: int, parts: list[tuple[_Block, int, int]], take: np.ndarray | None) -> BatchPlan:
    """``parts``: (block, first, stop) ranges of each block's planned rows (its kept rows
    when resuming); ``take``: positions in their concatenation, in batch order, or None."""
    refs: dict[Any, int] = {}
    pieces = []
    nbytes = 0.0
    planned = sum(hi - lo for _, lo, hi in parts)
    if all(blk.keep is None for blk, _, _ in parts):
        for blk, lo, hi in parts:
            i = refs.setdefault(blk.ref, len(refs))
            pieces.append((i, blk.base + lo, blk.base + hi))
            nbytes += blk.row_bytes * (hi - lo)
    else:  # resuming: kept rows are not contiguous, so gather them with `take`
        positions, offset = [], 0
        for blk, lo, hi in parts:
            real = blk.keep[lo:hi] if blk.keep is not None else np.arange(lo, hi)
            first, stop = int(real[0]), int(real[-1]) + 1
            i = refs.setdefault(blk.ref, len(refs))
            pieces.append((i, blk.base + first, blk.base + stop))
            positions.append(offset + real - first)
            offset += stop - first
            nbytes += blk.row_bytes * (hi - lo)
        gather = np.concatenate(positions)
        take = gather if take is None else gather[take]
    rows = len(take) if take is not None else planned
    nbytes = nbytes * rows / max(1, planned)
    return BatchPlan(idx, tuple(refs), tuple(pieces), rows, int(nbytes), take)


def kept_rows(
    block: Any, rows: tuple[int, int] | None, consumed: Any, id_column: str
) -> np.ndarray:
    """Offsets (in the stream's slice of ``block``) of the rows whose ID is not in
    ``consumed`` (see ``kernels.ids.consumed_mask``) — what ``resume.drop_consumed`` keeps.
    Runs as a Ray task by the block."""
    table = to_arrow(block)
    if rows is not None:
        table = table.slice(rows[0], rows[1] - rows[0])
    check_column(id_column, table.column_names)
    if table.num_rows == 0:
        return np.arange(0)
    return np.flatnonzero(~consumed_mask(ids_as_uint64(table.column(id_column)), consumed))


def plan_batches(
    blocks: Iterable[SourceBlock],
    *,
    batch_size: int,
    drop_last: bool = False,
    shuffle_buffer_size: int | None = None,
    shuffle_seed: int | None = None,
    epoch: int = 0,
    stats: StatsRecorder | None = None,
    keep_rows: Callable[[SourceBlock], np.ndarray] | None = None,
) -> Iterator[BatchPlan]:
    """Stage 3 on metadata: the same batches as ``blocks_to_batches`` for the same blocks
    (same rows, same order, same shuffle for the same seed and epoch), as plans.

    ``keep_rows(block)``: when resuming with rows to drop, the offsets of the rows to keep
    (``kept_rows``, run by the block); plans then cover only those, as stage 3 would after
    ``drop_keys``. The one place this path looks at data, and only at the ID column.
    """
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be >= 1")
    stats = stats if stats is not None else StatsRecorder()
    stream = _blocks(blocks, stats, keep_rows)
    if shuffle_buffer_size:
        rng = np.random.default_rng(None if shuffle_seed is None else [shuffle_seed, epoch])
        yield from _shuffled_plans(stream, batch_size, drop_last, shuffle_buffer_size, rng, stats)
    else:
        yield from _sequential_plans(stream, batch_size, drop_last, stats)


def _emit(plan: BatchPlan, stats: StatsRecorder) -> BatchPlan:
    stats.buffer(1, plan.nbytes)
    return plan


def _sequential_plans(
    stream: Iterator[_Block], batch_size: int, drop_last: bool, stats: StatsRecorder
) -> Iterator[BatchPlan]:
    idx = 0
    carry: list[tuple[_Block, int, int]] = []
    carry_rows = 0
    for blk in stream:
        offset = 0
        while offset < blk.rows:
            take = min(batch_size - carry_rows, blk.rows - offset)
            carry.append((blk, offset, offset + take))
            carry_rows += take
            offset += take
            if carry_rows == batch_size:
                yield _emit(_plan(idx, carry, None), stats)
                idx += 1
                carry, carry_rows = [], 0
    if carry_rows:
        if drop_last:
            stats.add_dropped(carry_rows, "drop_last=True (last partial batch)")
        else:
            yield _emit(_plan(idx, carry, None), stats)


def _shuffled_plans(
    stream: Iterator[_Block],
    batch_size: int,
    drop_last: bool,
    buffer_rows: int,
    rng: np.random.Generator,
    stats: StatsRecorder,
) -> Iterator[BatchPlan]:
    # The local path's draw (batching._shuffled) on global row positions: ``live`` stays in
    # ascending order there too (its compaction keeps the order), so the same generator
    # calls pick the same rows.
    blocks: list[_Block] = []
    starts: list[int] = []
    live = np.empty(0, dtype=np.int64)
    total = 0
    idx = 0

    def draw(count: int) -> BatchPlan:
        nonlocal live, idx
        t0 = time.perf_counter()
        pick = np.sort(rng.choice(len(live), size=count, replace=False))  # as batching.py
        rows = live[pick]
        live = np.delete(live, pick)
        which = np.searchsorted(np.asarray(starts), rows, side="right") - 1
        take = np.empty(count, dtype=np.int64)
        parts = []
        offset = 0
        for j in np.unique(which):
            mask = which == j
            local = rows[mask] - starts[j]
            lo, hi = int(local.min()), int(local.max()) + 1
            take[mask] = offset + (local - lo)
            offset += hi - lo
            blk = blocks[j]
            parts.append((blk, lo, hi))
            blk.live -= int(mask.sum())
        plan = _plan(idx, parts, take)
        for blk, _, _ in parts:
            if blk.live == 0:
                blk.ref = None  # fully planned: the plans hold what is still needed
        idx += 1
        stats.add_time("batching", time.perf_counter() - t0)
        return _emit(plan, stats)

    for blk in stream:
        blocks.append(blk)
        starts.append(total)
        live = np.concatenate([live, np.arange(total, total + blk.rows)])
        total += blk.rows
        while len(live) >= buffer_rows + batch_size:
            yield draw(batch_size)
    while len(live) >= batch_size:
        yield draw(batch_size)
    if len(live):
        if drop_last:
            stats.add_dropped(len(live), "drop_last=True (last partial batch)")
        else:
            yield draw(len(live))


# -- threads --------------------------------------------------------------------------------
@dataclass(eq=False)
class _Submitted:
    plan: BatchPlan
    ref: Any  # ObjectRef of the RemoteBatch descriptor
    actor: int


class _Shared:
    """What the plan and fetch threads share. Holds no reference to the run object, so
    dropping the iterator reaches ``EpochRun.__del__`` and stops them."""

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
    """A named daemon thread over ``_Shared`` with EpochRun's stage protocol (stop/close)."""

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
    """The fetch thread and the consumer's end of its output queue (EpochRun's ``_final``)."""

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
        drain(self._s.out)  # batches nobody will take: their buffers go back to the pool


class _Inline(Transport):
    """Stands in for the transport while EpochRun.__init__ builds its (unused) local stages."""

    needs_thread = False


class RemoteEpochRun(EpochRun):
    """One epoch with collate in Ray actors; see the module docstring.

    Same arguments as :class:`EpochRun`; ``fetcher`` is unused (the actors resolve the
    blocks) and ``transport`` must have ``remote_collate`` (NixlTransport).
    """

    def __init__(
        self,
        blocks: Iterable[SourceBlock],
        fetcher: Any,
        collate_fn: Callable[[Any], Any],
        transport: Any,  # a Transport with remote_collate (NixlTransport)
        config: PipelineConfig,
        **kwargs: Any,
    ) -> None:
        if not getattr(transport, "remote_collate", False):
            raise TypeError(f"{transport!r} does not collate remotely; use EpochRun")
        drop_keys = kwargs.pop("drop_keys", None)
        on_close = kwargs.pop("on_close", None)
        # EpochRun.__init__ sets up the consumer's state (counters, IDs, progress, stats);
        # the local stages it builds run over an empty stream (they end at once) and are
        # replaced by the remote ones below.
        super().__init__(
            (), fetcher, collate_fn, _Inline(), replace(config, num_workers=1), **kwargs
        )
        local = [st for st in (self._final, self._pool, self._prefetcher) if st is not None]
        for st in local:
            st.stop()
        for st in local:
            st.close()
        self._prefetcher = self._pool = self._final = None
        self._settle = False  # no local pool to give slots back to
        self.config = config
        self._transport = transport
        self._on_close = on_close
        self._actors: list[tuple[Any, str]] = []
        self._shared: _Shared | None = None
        epoch = self.epoch
        try:
            bound = config.prefetch_batches + transport.in_flight
            self._actors = transport.spawn_workers(
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
            self._prefetcher = _Thread(s, "trd-remote-plan", _plan_loop, plans, handles)  # type: ignore[assignment]
            self._final = _Output(s, transport, names, config.preserve_order, self.stats)  # type: ignore[assignment]
        except BaseException:
            self.close()
            raise

    @property
    def actors(self) -> list[Any]:
        """Handles of this epoch's collate actors (killed when the epoch closes)."""
        return [a for a, _ in self._actors]

    def close(self) -> None:
        if self._closed:
            return
        super().close()  # stops and joins both threads, then shuts the source down
        import ray

        refs: list[Any] = []
        if self._shared is not None:  # drop block and descriptor references now
            with self._shared.cond:
                refs = [c.ref for c in self._shared.submitted]
                self._shared.submitted.clear()
            self._shared = None
        actors, self._actors = self._actors, []
        for handle, _ in actors:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        _settle(refs)
        self._transport.forget([n for _, n in actors])  # type: ignore[attr-defined]


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
