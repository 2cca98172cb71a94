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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ...pipeline.constants import JOIN_TIMEOUT, QUEUE_TIMEOUT
from ...pipeline.errors import ExceptionWrapper
from ...pipeline.queues import Inbox, Slots, drain
from ...pipeline.stats import StatsRecorder
from ...pipeline.types import Batch
from .plan import BatchPlan

__all__ = ["Output", "RemoteCollateError", "Shared", "StageThread", "plan_loop"]

_END = object()


class RemoteCollateError(RuntimeError):
    """A collate actor died (or could not start) while a batch was assigned to it."""


@dataclass(eq=False)
class _Submitted:
    plan: BatchPlan
    ref: Any  # ObjectRef of the RemoteBatch descriptor
    actor: int


class Shared:
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
        self.failed = False  # a thread failed: the actors are not handed on to the next epoch
        self.out: queue.SimpleQueue[Any] = queue.SimpleQueue()


def plan_loop(
    s: Shared, plans: Iterator[BatchPlan], actors: list[Any], generation: int
) -> None:
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
            ref = actors[i].collate.remote(plan, generation)
            with s.cond:
                s.submitted.append(_Submitted(plan, ref, i))
                s.cond.notify_all()
            del plan, ref
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


def _resolve(s: Shared, item: _Submitted, names: list[str]) -> Any:
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


def fetch_loop(
    s: Shared,
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


class StageThread:
    """A named daemon thread over ``Shared`` with a stage's stop/close protocol."""

    def __init__(self, s: Shared, name: str, target: Callable[..., None], *args: Any) -> None:
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


class Output(StageThread):
    """The fetch thread and the consumer's end of its output queue (the chain's last stage)."""

    def __init__(self, s: Shared, *args: Any) -> None:
        super().__init__(s, "trd-remote-fetch", fetch_loop, *args)
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
