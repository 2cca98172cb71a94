"""Stage 4: ``iter_threaded`` — a bounded pool of threads applying ``fn`` to each item.

Owns the format/collate threads, their shared input, the one output queue and the bound
on how many items are taken but not yet consumed. Does not own ordering (stage 5 does:
results come out in completion order) nor what ``fn`` does.

Why hand-written: ``concurrent.futures`` cannot bound in-flight work against a lazy
input without one future per item, and gives no way to share one *stateful* input
iterator safely; ``torchdata.nodes.ParallelMapper`` does this but pulls in torchdata's
node protocol for one function. This is ~150 lines with the invariant written down.

    input iterator --(lock)--> worker 0..N-1: fn(item) --> output queue --> consumer

Invariant (the semaphore ``slots``, initial value ``output_buffer_size``; see queues.Slots):
    items taken from the input and not yet released
        = in fn on a worker + waiting in the output queue (+ held downstream, when the
          caller releases manually, e.g. the reorder buffer)
        <= output_buffer_size
A worker acquires a slot *before* pulling an item and the consumer releases it when it
takes the result (or, with ``manual_release=True``, when the caller says so).

Growing (``initial_workers < num_workers``): the pool starts ``initial_workers`` threads
and the consumer starts one more each time it finds the output empty with every started
worker inside ``fn`` on ``GROW_AFTER`` consecutive calls: only when ``fn`` is what the
consumer waits for. Why: every thread of ours that wants the GIL takes it from the
training step. Measured with a 5 ms step on 3x64x64 uint8 batches (docs/performance.md,
issue 13): 1 worker kept up and the step's between-batch overhead had p95 0.05 ms; 2 and
4 workers, which that load never needed, 1.2 and 1.1 ms.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from .._checks import check_int
from .constants import JOIN_TIMEOUT, QUEUE_TIMEOUT
from .errors import ExceptionWrapper
from .queues import Slots, drain

__all__ = ["iter_threaded", "ThreadedIterator"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()  # a worker's last message

#: Consecutive ``next()`` calls that found the output empty with every started worker
#: busy in ``fn`` before one more worker is started (one such call can be a hiccup).
GROW_AFTER = 2


class ThreadedIterator(Generic[R]):
    """The iterator returned by :func:`iter_threaded`. Close it (or let it be collected)
    to stop and join every worker; it is also a context manager."""

    def __init__(
        self,
        iterator: Iterable[T],
        fn: Callable[[T], R],
        *,
        num_workers: int,
        output_buffer_size: int,
        stage: str = "iter_threaded",
        describe: Callable[[T], str] | None = None,
        manual_release: bool = False,
        on_busy: Callable[[float], None] | None = None,
        initial_workers: int | None = None,
        on_grow: Callable[[int], None] | None = None,
        on_thread_cpu: Callable[[float], None] | None = None,
    ) -> None:
        num_workers = check_int("num_workers", num_workers, 1)
        output_buffer_size = check_int("output_buffer_size", output_buffer_size, 1)
        initial = check_int("initial_workers", initial_workers, 1, allow_none=True)
        initial = num_workers if initial is None else min(initial, num_workers)
        self._manual_release = manual_release
        self._defer_release = False
        self._owed = 0
        self._closed = False
        # Workers see only this shared state, never the handle: dropping the handle (break,
        # GC) runs __del__, which stops and joins them.
        self._s = _PoolState(
            iter(iterator),
            fn,
            stage,
            describe,
            on_busy,
            output_buffer_size,
            num_workers,
            on_thread_cpu,
        )
        self._alive = initial  # workers that have not sent _DONE (consumer-side count)
        self._max_workers = num_workers
        self._starved = 0  # consecutive next() calls that waited on busy workers
        self._on_grow = on_grow
        # One worker starts here and starts the others: the consumer does not wait for N
        # thread starts (each Thread.start waits for the new thread to run: 1.75 of 4.4 ms
        # to the first batch were five thread starts); they overlap the first block's fetch
        # instead (measured: iter() 2.08 -> 0.79 ms).
        with self._s.threads_lock:
            self._s.unspawned = initial - 1
            self._s.start_worker(0, spawner=True)

    # -- consumer side ------------------------------------------------------------------
    def __iter__(self) -> ThreadedIterator[R]:
        return self

    def __next__(self) -> R:
        if self._s.workers < self._max_workers and self._s.out.empty():
            self._maybe_grow()
        else:
            self._starved = 0
        while self._alive > 0:
            try:
                item = self._s.out.get(timeout=QUEUE_TIMEOUT)
            except queue.Empty:
                continue
            if item is _DONE:
                self._alive -= 1
                continue
            if self._defer_release:
                self._owed += 1
            elif not self._manual_release:
                self._s.slots.release()
            if isinstance(item, ExceptionWrapper):
                self.close()
                item.reraise()
            return item
        self.close()
        raise StopIteration

    def _maybe_grow(self) -> None:
        """Start one more worker after ``GROW_AFTER`` consecutive calls that found nothing
        ready while every started worker was inside ``fn`` (see the module docstring)."""
        s = self._s
        if s.unspawned or not all(s.busy[: s.workers]):
            self._starved = 0  # still starting, or a worker is idle: fn is not the bottleneck
            return
        self._starved += 1
        if self._starved < GROW_AFTER:
            return
        self._starved = 0
        with s.threads_lock:
            if s.stop.is_set() or s.exhausted or s.workers >= self._max_workers:
                return
            self._alive += 1  # before it starts: its _DONE is counted
            try:
                s.start_worker(s.workers)
            except BaseException:  # noqa: BLE001 - e.g. "can't start new thread": keep going
                self._alive -= 1
                self._max_workers = s.workers
                logger.warning("torch_raydata: %s could not start another thread", s.stage)
                return
        if self._on_grow is not None:
            self._on_grow(s.workers)

    @property
    def workers(self) -> int:
        """Worker threads started so far (grows up to ``num_workers``)."""
        return self._s.workers

    def has_ready(self) -> bool:
        """True when a result is waiting, so ``next()`` would not block."""
        return not self._s.out.empty()

    def release(self) -> None:
        """Give back one slot (only with ``manual_release=True``)."""
        self._s.slots.release()

    def defer_releases(self) -> None:
        """From now on ``next()`` frees its slot only at :meth:`settle`: the consumer
        settles after its own bookkeeping, so a worker it wakes does not compete with it
        for the GIL while it is still inside ``next()`` (measured with a 5 ms training
        step: the p95 of the wait inside ``next()`` went from 0.11 to 0.054 ms with 4
        workers, from 0.074 to 0.043 ms with 2)."""
        self._defer_release = True

    def settle(self) -> None:
        """Free the slots of the items returned since the last call (deferred mode)."""
        while self._owed:
            self._owed -= 1
            self._s.slots.release()

    def stop(self) -> None:
        """Ask the workers to stop after their current item; does not wait."""
        self._s.stop.set()

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._s.threads_lock:  # after stop: no worker is started once this is read
            threads = list(self._s.threads)
        for t in threads:
            if t is threading.current_thread():
                continue
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                logger.error(
                    "torch_raydata: thread %s did not stop within %.0fs (stuck in %s?)",
                    t.name,
                    timeout,
                    self._s.stage,
                )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop()
        self.join()
        self._alive = 0  # a closed iterator is exhausted
        # Drop results nobody will consume so they free their memory now.
        drain(self._s.out)
        # Let go of the input (stage 3's generator and the blocks it holds): a closed pool
        # that something still references (a traceback frame) must not pin the object store.
        self._s.input = iter(())

    def __enter__(self) -> ThreadedIterator[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Threads hold no reference to this object's owner, so dropping the iterator
        # (break, GC) reaches here and stops them.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from __del__
            pass


class _PoolState:
    """What the workers share. Holds no reference to the ThreadedIterator handle."""

    def __init__(self, input_, fn, stage, describe, on_busy, bound, max_workers, on_thread_cpu):  # type: ignore[no-untyped-def]
        self.input = input_
        self.fn = fn
        self.stage = stage
        self.describe = describe
        self.on_busy = on_busy
        self.lock = threading.Lock()  # guards input and exhausted
        self.exhausted = False
        self.stop = threading.Event()
        self.slots = Slots(bound)
        self.out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.threads_lock = threading.Lock()  # guards threads and unspawned
        self.unspawned = 0  # workers the first one has yet to start
        # busy[i]: worker i is inside fn. One list store per change (atomic under the GIL);
        # the consumer reads it to decide whether to grow.
        self.busy = [False] * max_workers
        self.on_thread_cpu: Callable[[float], None] | None = on_thread_cpu

    @property
    def workers(self) -> int:
        return len(self.threads)

    def start_worker(self, i: int, spawner: bool = False) -> None:
        t = threading.Thread(
            target=_worker, args=(self, i, spawner), name=f"trd-{self.stage}-{i}", daemon=True
        )
        t.start()
        self.threads.append(t)

    def spawn_rest(self) -> None:
        """Start the workers not started yet, unless the pool is stopping; either way each
        of them is accounted for with one _DONE (the consumer counts them)."""
        with self.threads_lock:
            n, self.unspawned = self.unspawned, 0
            base = len(self.threads)
            failed = False
            for k in range(n):
                if failed or self.stop.is_set() or self.exhausted:
                    self.out.put(_DONE)  # never started: its last message, sent for it
                    continue
                try:
                    self.start_worker(base + k)
                except BaseException as e:  # noqa: BLE001 - e.g. "can't start new thread"
                    # The consumer raises it (and stops the pool) rather than waiting
                    # for a worker that does not exist.
                    self.out.put(ExceptionWrapper.capture(e, f"starting {self.stage} worker"))
                    self.out.put(_DONE)
                    failed = True


def _worker(s: _PoolState, index: int, spawner: bool = False) -> None:
    try:
        if spawner:
            s.spawn_rest()
        while not s.stop.is_set():
            if not s.slots.acquire(timeout=QUEUE_TIMEOUT):
                continue
            with s.lock:
                # Checked under the lock: once stop is set no worker pulls another item.
                if s.stop.is_set() or s.exhausted:
                    s.slots.release()
                    return
                try:
                    item = next(s.input)
                except StopIteration:
                    s.exhausted = True
                    s.slots.release()
                    return
                except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                    s.exhausted = True
                    s.out.put(ExceptionWrapper.capture(e, f"the input of {s.stage}"))
                    return
            t0 = time.perf_counter()
            s.busy[index] = True
            try:
                result: Any = s.fn(item)
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                where = s.stage if s.describe is None else f"{s.stage}, {s.describe(item)}"
                result = ExceptionWrapper.capture(e, where)
            s.busy[index] = False
            del item
            if s.on_busy is not None:
                s.on_busy(time.perf_counter() - t0)
            s.out.put(result)
            del result
    finally:
        if s.on_thread_cpu is not None:
            s.on_thread_cpu(time.thread_time())
        s.out.put(_DONE)


def iter_threaded(
    iterator: Iterable[T],
    fn: Callable[[T], R],
    *,
    num_workers: int,
    output_buffer_size: int,
    stage: str = "iter_threaded",
    describe: Callable[[T], str] | None = None,
    manual_release: bool = False,
    on_busy: Callable[[float], None] | None = None,
    initial_workers: int | None = None,
    on_grow: Callable[[int], None] | None = None,
    on_thread_cpu: Callable[[float], None] | None = None,
) -> ThreadedIterator[R]:
    """Apply ``fn`` to every item of ``iterator`` on ``num_workers`` threads.

    ``fn`` maps ONE item to one result, so N workers never run N copies of a stateful
    iterator function; the workers share ``iterator`` under a lock. Results come in
    completion order. At most ``output_buffer_size`` items are taken from ``iterator``
    and not yet consumed (in ``fn`` + queued), whatever the consumer's speed.

    An exception from ``fn`` or from ``iterator`` is re-raised on the consumer with its
    original type, message and traceback, plus a note naming ``stage`` and, if
    ``describe`` is given, the item (e.g. ``"batch 17"``). Breaking out, ``close()``,
    garbage collection or an exception stop and join every worker.

    Args:
        iterator: the shared input; pulled under a lock, one item at a time.
        fn: ``item -> result``; runs concurrently on the workers.
        num_workers: threads (>= 1).
        output_buffer_size: bound on items taken and not yet consumed (>= 1).
        stage: name used in thread names and error notes.
        describe: ``item -> str`` for error notes.
        manual_release: if True, a slot is freed only by :meth:`ThreadedIterator.release`
            (lets a downstream buffer, such as reorder, count against the same bound).
        on_busy: called with the seconds each ``fn`` call took (stats).
        initial_workers: threads started at once (None: ``num_workers``); the pool adds
            one at a time, up to ``num_workers``, while the consumer waits on ``fn``.
        on_grow: called on the consumer's thread with the new thread count when it grows.
        on_thread_cpu: called by each worker as it exits with its CPU seconds (stats).

    Returns:
        A :class:`ThreadedIterator`.

    Example:
        >>> with iter_threaded(range(10), lambda x: x * x, num_workers=2,
        ...                    output_buffer_size=4) as it:
        ...     sorted(it)
        [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]
    """
    return ThreadedIterator(
        iterator,
        fn,
        num_workers=num_workers,
        output_buffer_size=output_buffer_size,
        stage=stage,
        describe=describe,
        manual_release=manual_release,
        on_busy=on_busy,
        initial_workers=initial_workers,
        on_grow=on_grow,
        on_thread_cpu=on_thread_cpu,
    )
