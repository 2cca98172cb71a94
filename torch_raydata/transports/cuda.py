"""CudaTransport: host batches -> one CUDA device, on a dedicated copy stream.

Owns: a pool of pinned host staging buffers (collate writes *into* them, so the one copy
out of the object store lands in pinned memory and H2D needs no second host copy), the
copy stream, one event per batch, and the hand-over to the training step's stream.

Stream discipline (the bug of Ray's closed #64431 was synchronising the wrong stream):
finalize posts copies on ``copy_stream`` from its own thread; the *consumer* thread, in
:meth:`on_consume`, makes ITS current stream wait on the batch's event and
``record_stream``-s every device tensor on it, so the caching allocator never hands that
memory out while the step may still use it. The device index is fixed at construction
(a bare "cuda" resolved later on the finalize thread could pick another GPU, Ray #65059).

A staging buffer goes back to the pool only once its batch's copy event has completed.
All CUDA calls go through :class:`CudaOps` so the bookkeeping is tested without a GPU.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from .._checks import resolve_device
from ..kernels.nested import map_leaves
from ..pipeline.transport import FetchRequest, Transport

__all__ = ["CudaTransport", "CudaOps", "PinnedPool"]

logger = logging.getLogger(__name__)


class CudaOps:
    """The CUDA calls CudaTransport makes (a seam: tests pass a CPU fake)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, host: torch.Tensor, stream: Any) -> torch.Tensor:
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            return host.to(self.device, non_blocking=True)

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def done(self, event: Any) -> bool:
        return bool(event.query())

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def consumer_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)


def _round_up(n: int, quantum: int = 1 << 16) -> int:
    return max(quantum, (n + quantum - 1) // quantum * quantum)


class PinnedPool:
    """Pinned host buffers, reused by size class, bounded in total bytes.

    Sizes round up to 64 KiB so variable-length batches reuse buffers; when the bound is
    reached, requests fall back to pageable memory (counted in ``fallbacks``) rather than
    block, so a slow consumer can never deadlock the collate threads.
    """

    def __init__(self, alloc: Callable[[int], torch.Tensor], max_bytes: int) -> None:
        self._alloc = alloc
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = {}
        self._leased: dict[int, torch.Tensor] = {}  # data_ptr -> raw buffer
        self.total_bytes = 0
        self.fallbacks = 0

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        size = _round_up(nbytes)
        with self._lock:
            stack = self._free.get(size)
            raw = stack.pop() if stack else None
            if raw is None and self.total_bytes + size > self.max_bytes:
                self.fallbacks += 1
                return torch.empty(shape, dtype=dtype)
            if raw is None:
                self.total_bytes += size
        if raw is None:
            raw = self._alloc(size)
        with self._lock:
            self._leased[raw.data_ptr()] = raw
        return raw[:nbytes].view(dtype).view(shape)

    def owns(self, t: torch.Tensor) -> int | None:
        """The key of the pooled buffer behind ``t``, if any."""
        ptr = t.untyped_storage().data_ptr()
        return ptr if ptr in self._leased else None

    def release(self, key: int) -> None:
        with self._lock:
            raw = self._leased.pop(key, None)
            if raw is not None:
                self._free.setdefault(raw.numel(), []).append(raw)

    @property
    def leased(self) -> int:
        return len(self._leased)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._leased.clear()
            self.total_bytes = 0


class CudaTransport(Transport):
    """Moves batches to ``device`` on a copy stream; see the module docstring.

    Args:
        device: a CUDA device; its index is fixed now.
        max_pinned_bytes: bound on pinned staging memory (default 1 GiB).
        ops: the CUDA seam (tests only).
    """

    needs_thread = True

    def __init__(
        self,
        device: Any = "cuda",
        *,
        max_pinned_bytes: int = 1 << 30,
        ops: CudaOps | None = None,
    ) -> None:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"CudaTransport needs a CUDA device, got {device=}")
        if ops is None:
            dev = resolve_device(device)
            ops = CudaOps(dev)
        super().__init__(dev)
        self._ops = ops
        self._stream: Any = None  # created lazily on the finalize thread's first post
        self.pinned_pool = PinnedPool(ops.pinned, max_pinned_bytes)
        self._in_flight: deque[tuple[Any, list[int]]] = deque()  # (event, pooled keys)
        self._events: dict[int, Any] = {}  # id(device payload) -> its copy event
        self._lock = threading.Lock()

    @property
    def host_allocator(self) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor]:
        """Collate straight into pinned staging memory."""
        return self.pinned_pool

    def _reclaim(self, block: bool = False) -> None:
        while self._in_flight:
            event, keys = self._in_flight[0]
            if not self._ops.done(event):
                if not block:
                    return
                self._ops.synchronize(event)
            self._in_flight.popleft()
            for k in keys:
                self.pinned_pool.release(k)

    def fetch_multiple(self, batches: list[Any]) -> FetchRequest:
        if self._stream is None:
            self._stream = self._ops.new_stream()
        self._reclaim()
        out, events = [], []
        for batch in batches:
            keys: list[int] = []

            def move(t: torch.Tensor, keys: list[int] = keys) -> torch.Tensor:
                if t.device == self.device:
                    return t
                k = self.pinned_pool.owns(t)
                if k is not None:
                    keys.append(k)
                return self._ops.copy(t, self._stream)

            moved = map_leaves(batch, move)
            event = self._ops.new_event()
            self._ops.record(event, self._stream)
            self._in_flight.append((event, keys))
            out.append(moved)
            events.append(event)
        return FetchRequest(batches=batches, handle=(out, events))

    def wait_fetch_complete(self, request: FetchRequest, timeout: float | None = None) -> list[Any]:
        # Does not block on the GPU: the consumer's stream waits on each event in
        # on_consume, on the consumer's own thread.
        out, events = request.handle
        with self._lock:
            for payload, event in zip(out, events, strict=True):
                self._events[id(payload)] = event
        return out

    def on_consume(self, data: Any) -> Any:
        with self._lock:
            event = self._events.pop(id(data), None)
        if event is None:
            return data
        stream = self._ops.consumer_stream()
        self._ops.wait(stream, event)

        def record(t: torch.Tensor) -> torch.Tensor:
            # Every tensor of a fetched payload is on the device (fetch_multiple moved them).
            self._ops.record_stream(t, stream)
            return t

        map_leaves(data, record)
        return data

    def close(self) -> None:
        self._reclaim(block=True)
        with self._lock:
            self._events.clear()
        self.pinned_pool.clear()
