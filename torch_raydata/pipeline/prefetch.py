"""Stage 2: prefetch — background threads keep a byte-bounded window of blocks in flight.

Owns: pulling block references from stage 1, asking the object store to bring them to
this node, resolving them, and handing them on in stream order. Does not own: how refs
are produced (stage 1, ``source.py``) or what a block contains (stage 3).

Each loop iteration makes ONE batched ``wait`` over every pending ref (with Ray:
``ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=True)``, which also
starts pulling every pending block to this node) and ONE batched ``get`` of the ready
ones — never a blocking per-ref call on the consumer's path (upstream Ray #63701/#64378).
Only when nothing at all is ready does it block, in a wait that returns as soon as *any*
pending block is ready.

The window counts bytes from the moment a ref is pulled from the source until the
consumer takes the resolved block, so blocks waiting in the output queue count too.
It always admits one block, however large, so an oversized block cannot deadlock.

Pulling from the source blocks until Ray has produced the next block, so it runs on a
thread of its own (``trd-prefetch-source``, bounded by the same window): a block that is
ready is handed on at once, never held back while the next one is produced. (With one
thread doing both, a block waited until the window was full: measured on W7, the first
batch of an epoch came 0.4-1.0 s after its first block, once four blocks were in.)
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

from .constants import IDLE_WAIT, JOIN_TIMEOUT, QUEUE_TIMEOUT
from .errors import ExceptionWrapper
from .queues import Inbox, drain
from .stats import StatsRecorder
from .types import SourceBlock

__all__ = ["Fetcher", "Prefetcher"]

_END = object()
_PENDING = object()


class Fetcher(Protocol):
    """How the prefetcher talks to the object store (``source.RayFetcher`` in production)."""

    def wait(self, refs: list[Any], *, timeout: float, num_returns: int | None = None) -> list[Any]:
        """Return the refs among ``refs`` that are ready (at least ``num_returns`` of them
        unless ``timeout`` passes; None means all). Must also start fetching all of them."""
        ...

    def get(self, refs: list[Any]) -> list[Any]:
        """Resolve ready refs, in the order given."""
        ...


class Prefetcher:
    """Iterator of ``(SourceBlock, block)`` in stream order, fed by two background threads.

    Args:
        blocks: stage 1's iterator of :class:`SourceBlock`.
        fetcher: see :class:`Fetcher`.
        window_rows: how many rows to keep in flight; converted to bytes with the average
            row size seen in block metadata (``prefetch_batches * batch_size`` rows).
        max_bytes: a hard byte bound instead (wins over ``window_rows`` when both given).
        stats: where to report buffered bytes and busy time.
    """

    def __init__(
        self,
        blocks: Iterator[SourceBlock],
        fetcher: Fetcher,
        *,
        window_rows: int | None = None,
        max_bytes: int | None = None,
        stats: StatsRecorder | None = None,
    ) -> None:
        if window_rows is None and max_bytes is None:
            raise ValueError("Prefetcher needs window_rows or max_bytes")
        self._blocks = blocks
        self._fetcher = fetcher
        self._window_rows = window_rows
        self._max_bytes = max_bytes
        self._stats = stats if stats is not None else StatsRecorder()
        self._stop = threading.Event()
        # The source thread stops pulling (stop(), or the prefetch thread ended).
        self._halt = threading.Event()
        self._space = threading.Condition()  # guards _window_bytes
        self._window_bytes = 0
        self._seen_rows = 0
        self._seen_bytes = 0
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inbox = Inbox(self._out, self._stop, _END)
        # Blocks the source thread pulled, for the prefetch thread (under _space).
        self._arrived: deque[SourceBlock] = deque()
        self._source_done = False
        self._source_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="trd-prefetch", daemon=True)
        self._reader = threading.Thread(
            target=self._read, name="trd-prefetch-source", daemon=True
        )
        self._thread.start()
        self._reader.start()

    # -- budget ---------------------------------------------------------------------------
    def budget_bytes(self) -> int:
        if self._max_bytes is not None:
            return self._max_bytes
        if self._seen_rows == 0:
            return 0  # unknown row size: admit one block, then decide
        assert self._window_rows is not None
        return int(self._window_rows * self._seen_bytes / self._seen_rows)

    def _account(self, nbytes: int) -> None:
        with self._space:
            self._window_bytes += nbytes
            if nbytes < 0:
                self._space.notify_all()
        self._stats.buffer(0, nbytes)

    # -- source thread --------------------------------------------------------------------
    def _read(self) -> None:
        """Pull stage 1's blocks while the window admits them (blocking in the source)."""
        stats = self._stats
        try:
            while True:
                with self._space:
                    while not self._halt.is_set() and not self._admit_locked():
                        self._space.wait(QUEUE_TIMEOUT)
                if self._halt.is_set():
                    return
                t0 = time.perf_counter()
                try:
                    sb = next(self._blocks)
                except StopIteration:
                    return
                finally:
                    stats.add_time("source", time.perf_counter() - t0)
                with self._space:
                    if self._halt.is_set():
                        return  # nobody will take it; it was never counted
                    if sb.num_rows:
                        self._seen_rows += sb.num_rows
                        self._seen_bytes += sb.size_bytes
                    self._window_bytes += sb.size_bytes
                    # Counted before the consumer can take it (and uncount it).
                    stats.buffer(0, sb.size_bytes)
                    self._arrived.append(sb)
                    self._space.notify_all()
                stats.add_block()
        except BaseException as e:  # noqa: BLE001 - forwarded by the prefetch thread
            with self._space:
                self._source_error = e
        finally:
            with self._space:
                self._source_done = True
                self._space.notify_all()
            stats.add_thread_cpu(time.thread_time())

    # -- prefetch thread ------------------------------------------------------------------
    def _take_arrived(self, entries: deque[list[Any]]) -> tuple[bool, bool]:
        """Move the source thread's blocks into ``entries``; (any moved, source ended)."""
        with self._space:
            moved = bool(self._arrived)
            while self._arrived:
                entries.append([self._arrived.popleft(), _PENDING])
            error, done = self._source_error, self._source_done
        if error is not None:
            raise error
        return moved, done and not moved

    def _wait_for_arrival(self) -> None:
        with self._space:
            if not self._stop.is_set() and not self._arrived and not self._source_done:
                self._space.wait(QUEUE_TIMEOUT)

    def _run(self) -> None:
        entries: deque[list[Any]] = deque()  # [SourceBlock, value or _PENDING], stream order
        stats = self._stats
        try:
            while not self._stop.is_set():
                progressed, source_done = self._take_arrived(entries)
                if not entries:
                    if source_done:
                        break
                    self._wait_for_arrival()
                    continue
                # One batched wait over every pending ref, one batched get of the ready ones.
                pending = [e for e in entries if e[1] is _PENDING]
                if pending:
                    # Unique refs: ray.wait rejects duplicates (two slices of one block).
                    refs = list(dict.fromkeys(e[0].ref for e in pending))
                    t0 = time.perf_counter()
                    ready = self._fetcher.wait(refs, timeout=0)
                    if not ready and entries[0][1] is _PENDING:
                        stats.add_time("prefetch", time.perf_counter() - t0)
                        # Nothing ready at all: block until any one is (or IDLE_WAIT passes).
                        ready = self._fetcher.wait(refs, timeout=IDLE_WAIT, num_returns=1)
                        t0 = time.perf_counter()
                    if ready:
                        ready_set = set(ready)
                        ready_refs = [r for r in refs if r in ready_set]
                        value_of = dict(zip(ready_refs, self._fetcher.get(ready_refs), strict=True))
                        for e in pending:
                            if e[0].ref in value_of:
                                e[1] = value_of[e[0].ref]
                        progressed = True
                    stats.add_time("prefetch", time.perf_counter() - t0)
                # Hand on the in-order ready prefix.
                while entries and entries[0][1] is not _PENDING:
                    sb, value = entries.popleft()
                    self._out.put((sb, value))
                    progressed = True
                if not progressed and not pending:
                    self._wait_for_arrival()
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            if not self._stop.is_set():
                self._out.put(ExceptionWrapper.capture(e, "stage 2 (prefetch)"))
        finally:
            # Blocks still in the window when stopped leave the books with the thread
            # (those the source thread pulled and nobody took as well).
            self._halt.set()  # the source thread pulls no more
            with self._space:
                unsent = sum(e[0].size_bytes for e in entries)
                unsent += sum(sb.size_bytes for sb in self._arrived)
                self._arrived.clear()
                self._space.notify_all()
            if unsent:
                self._account(-unsent)
            self._stats.add_thread_cpu(time.thread_time())
            self._out.put(_END)

    def _admit_locked(self) -> bool:
        return self._window_bytes == 0 or self._window_bytes < self.budget_bytes()

    # -- consumer side ----------------------------------------------------------------------
    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[SourceBlock, Any]:
        item = self._inbox.next()
        self._account(-item[0].size_bytes)
        return item

    @property
    def window_bytes(self) -> int:
        return self._window_bytes

    def stop(self) -> None:
        self._stop.set()
        self._halt.set()
        with self._space:
            self._space.notify_all()

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for t in (self._thread, self._reader):
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.stop()
        self.join()
        self._blocks = iter(())  # drop stage 1's stream (its block refs) even if kept alive
        # Release what nobody will consume (the window's bytes leave the books too).
        drain(self._out, self._unaccount)

    def _unaccount(self, item: Any) -> None:
        if isinstance(item, tuple):
            self._account(-item[0].size_bytes)
