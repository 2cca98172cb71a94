"""Stage 6: finalize — the transport moves collated batches to the training device.

Owns: one thread that posts transfers (``Transport.fetch_multiple``) and waits for them
(``wait_fetch_complete``) in order, keeping up to ``in_flight`` batches posted or done
and not yet taken, so transfers overlap the training step. One thread only, so memory-
heavy work (device staging) is never run concurrently. Does not own how bytes move
(``transports/``).

A transport with ``needs_thread = False`` (LocalTransport) runs inline on the consumer:
no thread, no queue hop.

Bound: the semaphore ``slots`` (initial ``in_flight``) is acquired before a batch is
posted and released when the consumer takes it, so posted + finished-and-waiting
<= in_flight.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from .._checks import check_int
from .constants import FINALIZE_IN_FLIGHT, JOIN_TIMEOUT, QUEUE_TIMEOUT
from .errors import ExceptionWrapper
from .queues import Inbox, Slots, drain
from .stats import StatsRecorder
from .transport import FetchRequest, Transport
from .types import Batch

__all__ = ["Finalizer"]

_END = object()
_FLUSH_EVERY = 16  # inline finalize: batches between hand-offs of its time to the stats


class Finalizer:
    """Iterator of finalized :class:`Batch` es, in the order they came in."""

    def __init__(
        self,
        batches: Iterable[Batch],
        transport: Transport,
        *,
        in_flight: int = FINALIZE_IN_FLIGHT,
        stats: StatsRecorder | None = None,
    ) -> None:
        in_flight = check_int("in_flight", in_flight, 1)
        self._input = iter(batches)
        self._transport = transport
        self._stats = stats if stats is not None else StatsRecorder()
        self._stop = threading.Event()
        self._done = False
        self._thread: threading.Thread | None = None
        # The base fetch_multiple just calls fetch: inline, call it directly (no request
        # object per batch on the training step's thread).
        self._sync_fetch = type(transport).fetch_multiple is Transport.fetch_multiple
        # Inline path: finalize time is summed here (the training step's thread only) and
        # handed to the stats every _FLUSH_EVERY batches and at the end, not under the
        # stats lock per batch (that lock is shared with the collate threads: waiting for
        # it hands the GIL to them inside next()).
        self._inline_seconds = 0.0
        self._inline_count = 0
        if transport.needs_thread:
            self._slots = Slots(in_flight)
            self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
            self._inbox = Inbox(self._out, self._stop, _END)
            self._thread = threading.Thread(target=self._run, name="trd-finalize", daemon=True)
            self._thread.start()

    # -- inline path (no thread) -----------------------------------------------------------
    def _inline_next(self) -> Batch:
        batch = next(self._input)
        if isinstance(batch.data, ExceptionWrapper):  # failed upstream, kept in order
            batch.data.reraise()
        t0 = time.perf_counter()
        try:
            if self._sync_fetch:
                batch.data = self._transport.fetch(batch.data)
            else:
                req = self._transport.fetch_multiple([batch.data])
                (batch.data,) = self._transport.wait_fetch_complete(req)
        except BaseException as e:
            ExceptionWrapper.capture(e, f"stage 6 (finalize), batch {batch.idx}").reraise()
        self._inline_seconds += time.perf_counter() - t0
        self._inline_count += 1
        if self._inline_count % _FLUSH_EVERY == 0:
            self._flush_inline_time()
        return batch

    def _flush_inline_time(self) -> None:
        seconds, self._inline_seconds = self._inline_seconds, 0.0
        if seconds:
            self._stats.add_time("finalize", seconds)

    # -- threaded path --------------------------------------------------------------------
    def _upstream_ready(self) -> bool:
        # A pull would return at once. Unknown (e.g. the reorder generator) -> False, so
        # finished transfers are handed on before a pull that might block.
        ready = getattr(self._input, "has_ready", None)
        return bool(ready()) if ready is not None else False

    def _run(self) -> None:
        posted: deque[tuple[Batch, FetchRequest]] = deque()
        exhausted = False
        try:
            while not self._stop.is_set():
                if not exhausted and (not posted or self._upstream_ready()):
                    if not self._slots.acquire(timeout=0 if posted else QUEUE_TIMEOUT):
                        if not posted:
                            continue  # every slot is waiting for the consumer; re-check stop
                    else:
                        try:
                            batch = next(self._input)
                        except StopIteration:
                            exhausted = True
                            self._slots.release()
                            continue
                        if isinstance(batch.data, ExceptionWrapper):
                            # Failed upstream: hand on what is posted, then the error.
                            while posted:
                                done, req = posted.popleft()
                                (data,) = self._transport.wait_fetch_complete(req)
                                done.data = data
                                self._out.put(done)
                            self._out.put(batch.data)
                            return
                        t0 = time.perf_counter()
                        try:
                            req = self._transport.fetch_multiple([batch.data])
                        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                            self._slots.release()
                            self._out.put(
                                ExceptionWrapper.capture(
                                    e, f"stage 6 (finalize), batch {batch.idx}"
                                )
                            )
                            return
                        self._stats.add_time("finalize", time.perf_counter() - t0)
                        posted.append((batch, req))
                        continue
                if posted:
                    # Complete the oldest transfer and hand it on.
                    batch, req = posted.popleft()
                    t0 = time.perf_counter()
                    try:
                        (data,) = self._transport.wait_fetch_complete(req)
                    except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                        self._out.put(
                            ExceptionWrapper.capture(e, f"stage 6 (finalize), batch {batch.idx}")
                        )
                        return
                    self._stats.add_time("finalize", time.perf_counter() - t0)
                    batch.data = data
                    self._out.put(batch)
                elif exhausted:
                    return
        except BaseException as e:  # noqa: BLE001 - from the upstream iterator; forwarded
            if not self._stop.is_set():
                self._out.put(ExceptionWrapper.capture(e, "the input of stage 6 (finalize)"))
        finally:
            self._stats.add_thread_cpu(time.thread_time())
            self._out.put(_END)

    # -- consumer side ----------------------------------------------------------------------
    def __iter__(self) -> Finalizer:
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        if self._thread is None:
            try:
                return self._inline_next()
            except StopIteration:
                self._done = True
                self._flush_inline_time()
                raise
        try:
            item = self._inbox.next()
        except BaseException:
            self._done = True
            raise
        self._slots.release()
        return item

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self) -> None:
        self.stop()
        self.join()
        self._flush_inline_time()
        self._input = iter(())  # drop upstream stages (and their blocks) even if kept alive
        if self._thread is not None:
            drain(self._out)
