"""Pinned host staging buffers for host-to-device copies, reused by size class, bounded.

Owns: pinned buffers that collate writes into (so the one copy out of the object store
lands where the DMA engine reads it), their reuse, the byte budget, and the bookkeeping
that makes reuse safe. Does not own the copies or the streams (``transports/cuda.py``).

When may a buffer be reused? Only when both hold:
  1. nothing views it any more: the collated batch's tensors are gone (the lease of
     ``memory/buffers.py``: the numpy array torch wraps has a lease as its base, whose
     ``__del__`` hands the buffer back). A batch collated but never copied (``break``,
     ``limit_*_batches``, a collate or transfer error) thus returns its buffer too.
  2. every copy posted from it has completed: the transport calls :meth:`in_flight` with
     the event recorded after the copies; a returned buffer waits ("draining") until
     those events are done. Checked on every allocation and on :meth:`close`.
The lock ``_lock`` guards every move between leased, draining and free (the collate
threads allocate concurrently, the finalize thread posts, ``close()`` may run on a
third thread); lease returns only append to a deque (they run from garbage collection,
on any thread, possibly while this thread holds the lock).

Sizes: powers of two (at least ``MIN_CLASS``). torch's pinned allocator rounds every
request up to a power of two, so asking for exactly that makes the budget count what is
really pinned. When a size class is missing and the budget is full, least recently used
free buffers of other classes are evicted (and torch's pinned cache emptied, so they are
unpinned); when that is not enough, or pinning fails, the request falls back to pageable
memory (counted by reason) rather than block: a slow consumer never stalls collate.

Why hand-written: torch's own pinned cache has no budget, no "buffer back when the batch
dies" hook and no reuse bound to our copy events.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .buffers import Lease

__all__ = ["PinnedPool", "MIN_CLASS", "size_class"]

logger = logging.getLogger(__name__)

MIN_CLASS = 1 << 12  # one page


def size_class(nbytes: int) -> int:
    """The bytes pinned for a request of ``nbytes``: the next power of two (what torch's
    pinned allocator rounds to), at least ``MIN_CLASS``."""
    return max(MIN_CLASS, 1 << max(0, nbytes - 1).bit_length())


class _Tracker:
    """Addresses of live pageable fallback buffers (so a copy from one is not counted
    again as memory that was never staged)."""

    def __init__(self) -> None:
        self.live: set[int] = set()

    def _give_back(self, raw: np.ndarray, address: int) -> None:
        self.live.discard(address)


class PinnedPool:
    """An allocator ``(shape, dtype) -> torch.Tensor`` of pinned staging memory.

    Args:
        alloc: ``nbytes -> uint8 tensor`` of pinned memory (``CudaOps.pinned``).
        max_bytes: bound on pinned bytes, counted in the sizes really pinned.
        done: ``event -> bool``, has the event completed (non-blocking).
        synchronize: ``event -> None``, wait for the event.
        empty_cache: unpins what torch's pinned cache holds unused (after evictions and
            on :meth:`close`).
    """

    def __init__(
        self,
        alloc: Callable[[int], torch.Tensor],
        max_bytes: int,
        *,
        done: Callable[[Any], bool],
        synchronize: Callable[[Any], None],
        empty_cache: Callable[[], None] = lambda: None,
    ) -> None:
        self._alloc = alloc
        self.max_bytes = int(max_bytes)
        self._done = done
        self._synchronize = synchronize
        self._empty_cache = empty_cache
        self._lock = threading.Lock()
        self._self_ref = weakref.ref(self)
        self._leased: dict[int, torch.Tensor] = {}  # address -> raw, views may be alive
        self._orphans: set[int] = set()  # leased or draining when close() ran: never pooled
        self._returned: deque[int] = deque()  # addresses whose lease died (any thread)
        self._events: dict[int, list[Any]] = {}  # address -> copies posted from it
        self._draining: dict[int, torch.Tensor] = {}  # lease dead, copies maybe running
        self._free: dict[int, list[torch.Tensor]] = {}  # size -> raws
        self._lru: OrderedDict[int, int] = OrderedDict()  # free address -> size, oldest first
        self._tracker = _Tracker()
        self._tracker_ref = weakref.ref(self._tracker)
        self.reserved_bytes = 0  # pinned by us now (leased + draining + free + reserving)
        self.fallbacks: Counter[str] = Counter()  # reason -> pageable allocations
        self.evictions = 0

    # -- collate threads ---------------------------------------------------------------
    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        return torch.from_numpy(self._lease(nbytes)).view(dtype).view(shape)

    allocate = __call__

    def empty_numpy(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The same memory as a numpy array (for DefaultCollate's per-block path)."""
        return self._lease(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)

    def _lease(self, nbytes: int) -> np.ndarray:
        size = size_class(nbytes)
        raw = None
        evicted: list[torch.Tensor] = []
        with self._lock:
            self._reclaim_locked()
            stack = self._free.get(size)
            if stack:
                raw = stack.pop()
                del self._lru[_addr(raw)]
            else:
                if self.reserved_bytes - sum(self._lru.values()) + size > self.max_bytes:
                    return self._fallback(nbytes, "budget")  # in use, not evictable
                # Make room: least recently used free buffers of other classes first.
                while self.reserved_bytes + size > self.max_bytes and self._lru:
                    addr, s = self._lru.popitem(last=False)
                    stack = self._free[s]
                    # By position: `==` on tensors compares elements.
                    i = next(i for i, r in enumerate(stack) if _addr(r) == addr)
                    evicted.append(stack.pop(i))
                    self.reserved_bytes -= s
                    self.evictions += 1
                self.reserved_bytes += size  # reserved before pinning (outside the lock)
        if evicted:
            del evicted
            self._unpin()  # torch keeps freed pinned blocks cached: release them
        if raw is None:
            try:
                raw = self._alloc(size)
            except Exception as e:  # noqa: BLE001 - out of pinnable memory: pageable instead
                with self._lock:
                    self.reserved_bytes -= size
                    out = self._fallback(nbytes, "pin_failed")
                logger.warning(
                    "torch_raydata: pinning %d bytes failed (%s: %s); this batch uses pageable "
                    "memory", size, type(e).__name__, e,
                )
                return out
        addr = _addr(raw)
        with self._lock:
            self._leased[addr] = raw
        return np.asarray(Lease(raw.numpy(), addr, self._self_ref))[:nbytes]

    def _fallback(self, nbytes: int, reason: str) -> np.ndarray:
        self.fallbacks[reason] += 1
        arr = np.empty(max(1, nbytes), dtype=np.uint8)
        self._tracker.live.add(arr.ctypes.data)
        return np.asarray(Lease(arr, arr.ctypes.data, self._tracker_ref))[:nbytes]

    def _give_back(self, raw: np.ndarray, address: int) -> None:
        # From a Lease's __del__ (any thread, maybe inside this pool's lock): no lock here.
        self._returned.append(address)

    # -- finalize thread ---------------------------------------------------------------
    def owns(self, t: torch.Tensor) -> int | None:
        """The key of the pooled buffer behind ``t``, if any."""
        ptr = t.untyped_storage().data_ptr()
        return ptr if ptr in self._leased else None

    def is_fallback(self, t: torch.Tensor) -> bool:
        """``t`` views a pageable buffer this pool handed out instead (already counted)."""
        return t.untyped_storage().data_ptr() in self._tracker.live

    def in_flight(self, keys: list[int], event: Any) -> None:
        """Copies from the buffers ``keys`` were posted; ``event`` completes after them."""
        if not keys:
            return
        with self._lock:
            for k in keys:
                self._events.setdefault(k, []).append(event)

    # -- reuse ---------------------------------------------------------------------------
    def _reclaim_locked(self) -> None:
        """Returned buffers -> draining -> free once their copies are done (lock held)."""
        while self._returned:
            addr = self._returned.popleft()
            raw = self._leased.pop(addr, None)
            if raw is not None:
                self._draining[addr] = raw
        for addr in list(self._draining):
            events = self._events.get(addr)
            if events:
                events[:] = [e for e in events if not self._done(e)]
                if events:
                    continue  # a copy may still read it
                del self._events[addr]
            raw = self._draining.pop(addr)
            size = _size(raw)
            if addr in self._orphans:  # leased across close(): dropped, not pooled
                self._orphans.discard(addr)
                self.reserved_bytes -= size
                continue
            self._free.setdefault(size, []).append(raw)
            self._lru[addr] = size

    def reclaim(self) -> None:
        with self._lock:
            self._reclaim_locked()

    # -- accounting --------------------------------------------------------------------
    @property
    def free_bytes(self) -> int:
        with self._lock:
            self._reclaim_locked()
            return sum(self._lru.values())

    @property
    def in_use_bytes(self) -> int:
        """Pinned bytes held by batches (collated, being copied, or waiting for a copy)."""
        with self._lock:
            self._reclaim_locked()
            return self.reserved_bytes - sum(self._lru.values())

    @property
    def leased(self) -> int:
        """Buffers handed out whose views may still be alive."""
        with self._lock:
            self._reclaim_locked()
            return len(self._leased)

    def close(self) -> None:
        """Wait for every posted copy, drop every free buffer and unpin it. A buffer a
        batch still views (kept by the caller, or by a finalize thread not yet joined) is
        dropped once it comes back and its copies are done. The pool stays usable: a
        later epoch pins afresh."""
        try:
            with self._lock:
                self._reclaim_locked()
                pending = [e for evs in self._events.values() for e in evs]
            for e in pending:
                self._synchronize(e)
        finally:
            with self._lock:
                self._reclaim_locked()
                self._orphans.update(self._leased)
                self._orphans.update(self._draining)
                self.reserved_bytes -= sum(self._lru.values())
                self._free.clear()
                self._lru.clear()
            self._unpin()

    def _unpin(self) -> None:
        """Empty torch's pinned cache; best effort (a failure leaves memory pinned, never
        fails a batch or a close)."""
        try:
            self._empty_cache()
        except Exception:  # noqa: BLE001
            logger.warning("torch_raydata: emptying the pinned host cache failed", exc_info=True)


def _addr(raw: torch.Tensor) -> int:
    return raw.data_ptr()


def _size(raw: torch.Tensor) -> int:
    return raw.numel()
