"""The remote epoch's two threads and what they share (see ``epoch.py`` for the picture).

Owns: the plan thread (stages 1 and 3 on metadata, then one plan per slot to the least-
loaded actor), the fetch thread (stages 5 and 6: a group of ready descriptors, one READ
each, posted together, then waited on), their shared state and bound (``Shared.slots``),
and the consumer's end of the fetch thread's queue (``Output``). Errors travel as values
to the consumer, naming the stage, batch and actor. Does not own the actors (the
transport lends them) or the epoch's bookkeeping (``pipeline.consumer``).
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

from ...pipeline.constants import JOIN_TIMEOUT, QUEUE_TIMEOUT
from ...pipeline.errors import ExceptionWrapper
from ...pipeline.queues import Inbox, Slots, drain
from ...pipeline.stats import StatsRecorder
from ...pipeline.types import Batch
from .plan import BatchPlan
from .worker import CollateFailure

__all__ = [
    "Chunker",
    "Output",
    "RemoteCollateError",
    "Shared",
    "StageThread",
    "before_each",
    "plan_loop",
]

_END = object()


class RemoteCollateError(RuntimeError):
    """A collate actor died (or could not start) while a batch was assigned to it."""


@dataclass(eq=False)
class _Submitted:
    plan: BatchPlan
    ref: Any  # ObjectRef of the RemoteBatch descriptor (of a chunk's tuple of them)
    actor: int
    part: int = -1  # this plan's place in its chunk's tuple (-1: not chunked)


class Shared:
    """What the plan and fetch threads share. Holds no reference to the epoch object, so
    dropping the iterator reaches ``EpochConsumer.__del__`` and stops them."""

    def __init__(self, bound: int, num_actors: int) -> None:
        self.stop = threading.Event()
        self.bound = bound
        self.slots = Slots(bound)
        self.cond = threading.Condition()  # guards submitted, load, planner_done, error
        self.submitted: deque[_Submitted] = deque()
        self.load = [0] * num_actors  # descriptors outstanding per actor
        self.planner_done = False
        self.error: ExceptionWrapper | None = None
        self.failed = False  # a thread failed: the actors are not handed on to the next epoch
        self.out: queue.SimpleQueue[Any] = queue.SimpleQueue()


class Chunker:
    """Submits plans to the least-loaded actor, ``chunk`` at a time (one Ray call and one
    result object for several batches: ``collate_many``), or one at a time (``collate``).

    Plans are held back only while the planner is making more from blocks it already has:
    :meth:`before_pull` submits the pending ones before a pull from the source that may
    wait (``ready()``, the source's hint, is False or unknown), and :meth:`flush` at the
    end. Each pending plan holds a slot, and the chunk is smaller than the bound, so
    batches are downstream while plans wait (no deadlock, no starving).

    An epoch's first chunks ramp up (1, 2, 4, ... plans): a chunk's batches come back
    together, so a full first chunk would delay the epoch's first batch by ``chunk``
    collates.
    """

    def __init__(
        self,
        s: Shared,
        actors: list[Any],
        generation: int,
        chunk: int,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self._s = s
        self._actors = actors
        self._generation = generation
        self.chunk = max(1, min(chunk, s.bound - 1))
        self._ready = ready
        self._limit = 1  # this chunk's size: doubles up to `chunk` (the ramp)
        self._pending: list[BatchPlan] = []

    def add(self, plan: BatchPlan) -> None:
        self._pending.append(plan)
        if len(self._pending) >= self._limit:
            self.flush()

    def before_pull(self) -> None:
        """The planner is about to pull a block: submit what is pending unless the
        source says the pull will not wait."""
        if self._pending and (self._ready is None or not self._ready()):
            self.flush()

    def flush(self) -> None:
        plans, self._pending = self._pending, []
        if not plans or self._s.stop.is_set():
            return
        self._limit = min(self.chunk, self._limit * 2)
        s = self._s
        with s.cond:
            i = min(range(len(self._actors)), key=s.load.__getitem__)
            s.load[i] += len(plans)
        actor = self._actors[i]
        if len(plans) == 1:
            items = [_Submitted(plans[0], actor.collate.remote(plans[0], self._generation), i)]
        else:  # one object for the chunk: one wait and one get for all of its batches
            ref = actor.collate_many.remote(plans, self._generation)
            items = [_Submitted(p, ref, i, j) for j, p in enumerate(plans)]
        with s.cond:
            s.submitted.extend(items)
            s.cond.notify_all()


def plan_loop(s: Shared, plans: Iterator[BatchPlan], chunker: Chunker) -> None:
    """Stages 1 and 3, then submit: one slot per plan, through ``chunker``."""
    try:
        for plan in plans:
            while not s.slots.acquire(timeout=QUEUE_TIMEOUT):
                if s.stop.is_set():
                    return
            if s.stop.is_set():
                return
            chunker.add(plan)
            del plan
        chunker.flush()
    except BaseException as e:  # noqa: BLE001 - forwarded to the consumer, after earlier batches
        s.failed = True
        if not s.stop.is_set():
            s.error = ExceptionWrapper.capture(
                e, "stages 1-3 (source, planning) of the remote epoch"
            )
    finally:
        with s.cond:
            s.planner_done = True
            s.cond.notify_all()


def before_each(items: Iterable[Any], hook: Callable[[], None]) -> Iterator[Any]:
    """``items``, calling ``hook()`` before each pull (the chunker's ``before_pull``: the
    planner may block on the source)."""
    it = iter(items)
    while True:
        hook()
        try:
            item = next(it)
        except StopIteration:
            return
        yield item
        del item


def _resolve(s: Shared, item: _Submitted, names: list[str], got: dict[Any, Any]) -> Any:
    """The descriptor of ``item``; a dead actor or a failed collate raise, naming the batch.
    ``got``: results already retrieved in this group (a chunk's, by ref)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        if item.ref not in got:
            got[item.ref] = ray.get(item.ref)
        desc = got[item.ref] if item.part < 0 else got[item.ref][item.part]
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
    if isinstance(desc, CollateFailure):
        raise desc.error
    return desc


def fetch_loop(
    s: Shared,
    transport: Any,
    names: list[str],
    preserve_order: bool,
    stats: StatsRecorder,
) -> None:
    """Stages 5 and 6: groups of ready descriptors -> one READ each, posted together.

    With ``transport.take_ready`` (nothing to post, e.g. shm), a group is every
    descriptor ready now (in order with preserve_order), as soon as one is: no waiting
    for a full group, and one ``ray.wait`` for a chunk of batches finished together."""
    import ray

    greedy = bool(getattr(transport, "take_ready", False))
    k = 1 if greedy else transport.in_flight
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
                pool = (
                    itertools.islice(s.submitted, k)
                    if preserve_order and not greedy
                    else s.submitted
                )
                candidates = list(pool)
            refs = list(dict.fromkeys(c.ref for c in candidates))  # a chunk shares one
            need = min(k, len(refs))
            first = refs[:1] if greedy and preserve_order else refs
            ready, _ = ray.wait(first, num_returns=need, timeout=QUEUE_TIMEOUT)
            if len(ready) < need:
                continue  # re-check stop; a later group may complete first (unordered)
            if greedy and len(refs) > 1:  # and every other one ready by now
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            ready_set = set(ready)
            if greedy and preserve_order:  # the ready prefix, in batch order
                group = []
                for c in candidates:
                    if c.ref not in ready_set:
                        break
                    group.append(c)
            elif greedy:
                group = [c for c in candidates if c.ref in ready_set]
            else:
                group = [c for c in candidates if c.ref in ready_set][:need]
            with s.cond:
                for c in group:
                    s.submitted.remove(c)
            descs, failed, got = [], None, {}
            for c in group:  # every one, so no failed result goes unretrieved (Ray logs those)
                try:
                    descs.append(_resolve(s, c, names, got))
                except BaseException as e:  # noqa: BLE001 - the first failure is raised below
                    failed = failed or (c, e)
                else:
                    stats.add_time("collate", descs[-1].seconds)
            if failed is not None:
                c, err = failed
                where = f"stage 4 (remote collate on {names[c.actor]}), batch {c.plan.idx}"
                raise err
            # Step 6: post one READ per batch, all of them, then wait for all.
            where = (
                f"stage 6 (finalize, {getattr(transport, 'name', 'remote')} transfer), "
                f"batches {[c.plan.idx for c in group]}"
            )
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
        s.failed = True
        if not s.stop.is_set():
            s.out.put(ExceptionWrapper.capture(e, where))
    finally:
        s.out.put(_END)


def _counted(target: Callable[..., None], args: tuple, on_cpu: Any) -> None:
    """Run ``target(*args)``, then report the thread's CPU time (``stats()``'s loader CPU
    per batch: the remote epoch's threads take the GIL from the step too)."""
    try:
        target(*args)
    finally:
        if on_cpu is not None:
            on_cpu(time.thread_time())


class StageThread:
    """A named daemon thread over ``Shared`` with a stage's stop/close protocol."""

    def __init__(
        self,
        s: Shared,
        name: str,
        target: Callable[..., None],
        *args: Any,
        on_cpu: Callable[[float], None] | None = None,
    ) -> None:
        self._s = s
        self._thread = threading.Thread(
            target=_counted, args=(target, (s, *args), on_cpu), name=name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._s.stop.set()
        with self._s.cond:
            self._s.cond.notify_all()

    def close(self) -> None:
        self.stop()
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)


class Output(StageThread):
    """The fetch thread and the consumer's end of its output queue (the chain's last stage)."""

    def __init__(
        self, s: Shared, *args: Any, on_cpu: Callable[[float], None] | None = None
    ) -> None:
        super().__init__(s, "trd-remote-fetch", fetch_loop, *args, on_cpu=on_cpu)
        self._inbox = Inbox(s.out, s.stop, _END)

    def __iter__(self) -> Output:
        return self

    def __next__(self) -> Batch:
        s = self._s
        item = self._inbox.next()
        s.slots.release()
        return item

    def close(self) -> None:
        super().close()
        drain(self._s.out)  # batches nobody will take: their buffers go back to the pool
