"""Batch memory that is recycled once the training step has dropped every reference to it.

Why: a batch owns its memory (one copy out of the object store), and a fresh multi-MB
tensor per batch comes from a fresh ``mmap`` in glibc: every page faults and is zeroed by
the kernel before our copy writes it. Measured: copying 246 MB in 256-row batches ran
at 1.6 GB/s into a fresh ``torch.empty`` per batch and 4.85 GB/s into a reused buffer;
in the pipeline the pool took 19% less CPU per row. Tuning malloc for the whole process would be a
side effect on the user's program, so we keep our own free list instead.

Why hand-written: neither torch (no CPU caching allocator) nor numpy offers "give this
memory back when the last view of it dies". The mechanism is numpy's: the array handed to
``torch.from_numpy`` has a small lease object as its base; torch keeps the array alive as
long as any tensor (or view, slice, ``.numpy()``) uses the storage, and when the last one
goes, the lease's ``__del__`` puts the raw buffer back on the free list. So memory is reused
only once nobody can see it: in-place writes by the training step stay safe.
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import torch

__all__ = ["BufferPool", "Lease"]

_ITEMSIZE: dict[torch.dtype, int] = {}


class Lease:
    """The base object of a pooled array: returns ``raw`` to the pool when collected."""

    __slots__ = ("raw", "address", "pool", "__array_interface__", "__weakref__")

    def __init__(self, raw: np.ndarray, address: int, pool: weakref.ref[BufferPool]) -> None:
        self.raw = raw
        self.address = address
        self.pool = pool
        self.__array_interface__ = {
            "shape": (raw.nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
        }

    def __del__(self) -> None:
        pool = self.pool()
        if pool is not None:
            pool._give_back(self.raw, self.address)


class BufferPool:
    """An allocator ``(shape, dtype) -> torch.Tensor`` for collate functions.

    Args:
        max_free_bytes: free memory kept for reuse; beyond it, returned buffers are freed.
        min_bytes: smaller requests go straight to ``torch.empty`` (malloc reuses those
            without page faults anyway).
    """

    def __init__(self, max_free_bytes: int = 1 << 30, min_bytes: int = 1 << 16) -> None:
        self.max_free_bytes = max_free_bytes
        self.min_bytes = min_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[tuple[np.ndarray, int]]] = {}  # nbytes -> (raw, address)
        self._free_bytes = 0
        self._self_ref = weakref.ref(self)
        self.hits = 0
        self.misses = 0

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        itemsize = _ITEMSIZE.get(dtype)
        if itemsize is None:
            itemsize = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        if nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        return torch.from_numpy(self._lease(nbytes)).view(dtype).view(shape)

    allocate = __call__

    def empty_numpy(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The same memory as a numpy array (``torch.from_numpy`` of it keeps the lease).

        For DefaultCollate's per-block path: numpy's view and reshape hold the GIL, while
        each torch call releases and re-takes it (a wait for it under contention)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        return self._lease(nbytes).view(dtype).reshape(shape)

    def _lease(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of uint8 whose base is a lease on a pooled (or new) buffer."""
        with self._lock:
            stack = self._free.get(nbytes)
            entry = stack.pop() if stack else None
            if entry is not None:
                self._free_bytes -= nbytes
                self.hits += 1
            else:
                self.misses += 1
        if entry is None:
            raw = np.empty(nbytes, dtype=np.uint8)
            entry = (raw, raw.ctypes.data)
        return np.asarray(Lease(entry[0], entry[1], self._self_ref))  # base is the lease

    def _give_back(self, raw: np.ndarray, address: int) -> None:
        with self._lock:
            if self._free_bytes + raw.nbytes > self.max_free_bytes:
                return  # let it be freed
            self._free.setdefault(raw.nbytes, []).append((raw, address))
            self._free_bytes += raw.nbytes

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # A copy in another process starts empty (free buffers are local memory).
        return (BufferPool, (self.max_free_bytes, self.min_bytes))

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._free_bytes = 0

    def __repr__(self) -> str:
        return f"BufferPool(free_bytes={self._free_bytes}, hits={self.hits}, misses={self.misses})"
