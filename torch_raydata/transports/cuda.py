"""CudaTransport: host batches -> one CUDA device, on a dedicated copy stream.

Owns: the copy stream, one event per batch, the hand-over to the training step's stream,
and a pool of pinned host staging buffers (``memory/pinned.py``: collate writes *into*
them, so the one copy out of the object store lands in pinned memory and H2D needs no
second host copy).

Stream discipline (the bug of Ray's closed #64431 was synchronising the wrong stream):
  1. finalize posts each batch's copies on ``copy_stream`` from its own thread, then
     records the batch's event on that stream;
  2. the staging buffers the copies read go back to the pool only once that event has
     completed (``PinnedPool.in_flight``), and only once the batch's host tensors are gone;
  3. the *consumer* thread, in :meth:`on_consume`, makes ITS current stream wait on the
     event and ``record_stream``-s every device tensor on it, so the caching allocator
     never hands that memory to a later copy while the step may still use it.
The device index is fixed at construction (a bare "cuda" resolved later on the finalize
thread could pick another GPU, Ray #65059), and every CUDA call that allocates or creates
runs under ``torch.cuda.device(dev)`` (a collate thread pinning memory would otherwise
create a context on GPU 0).

All CUDA calls go through :class:`CudaOps`, a seam: the CPU tests pass a fake GPU whose
copies complete late (``tests/fake_cuda.py``).
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from .._checks import resolve_device
from ..kernels.nested import iter_leaves, map_leaves
from ..memory.pinned import PinnedPool
from ..pipeline.transport import FetchRequest, Transport, TransportStats

__all__ = ["CudaTransport", "CudaOps", "Handoff"]


class CudaOps:
    """The CUDA calls the device transports make (a seam: tests pass a CPU fake)."""

    #: NIXL memory kind and device id of buffers from :meth:`device_buffer`.
    nixl_mem = "VRAM"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def nixl_dev_id(self) -> int:
        return self.device.index or 0

    def new_stream(self) -> Any:
        with torch.cuda.device(self.device):
            return torch.cuda.Stream(device=self.device)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def pinned(self, nbytes: int) -> torch.Tensor:
        # The device guard: torch pins through the current device's context.
        with torch.cuda.device(self.device):
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.is_pinned()

    def empty_host_cache(self) -> None:
        """Unpin what torch's pinned cache holds unused (our dropped staging buffers)."""
        torch.accelerator.empty_host_cache()

    def copy(self, host: torch.Tensor, stream: Any) -> torch.Tensor:
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            return host.to(self.device, non_blocking=True)

    def clone(self, t: torch.Tensor, stream: Any) -> torch.Tensor:
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            return t.clone()

    def device_buffer(self, nbytes: int, stream: Any) -> torch.Tensor:
        """A NIXL READ destination. Allocated on ``stream`` (the clones reading it run
        there), then ``stream`` is synchronized: the caching allocator may hand out memory
        that queued work on ``stream`` still writes (a clone whose output was dropped
        early), and a READ writes outside any stream. New buffers are rare (reused)."""
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        stream.synchronize()
        return buf

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

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


class Handoff:
    """Device payloads -> the event the consumer's stream must wait on (step 3 above).

    Keyed by the payload's tensors, weakly: an entry disappears with its tensors, so a
    payload that never reaches :meth:`on_consume` (skipped, drained at a ``break``,
    dropped after an error) leaves nothing behind. No lock: single dict operations are
    atomic, and the weakref callbacks run from garbage collection on any thread.
    """

    def __init__(self, ops: Any) -> None:
        self._ops = ops
        self._events: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}

    def register(self, payload: Any, event: Any) -> None:
        events = self._events
        for t in iter_leaves(payload):
            key = id(t)
            events[key] = (weakref.ref(t, lambda _, k=key: events.pop(k, None)), event)

    def on_consume(self, data: Any) -> Any:
        """On the consumer's thread: its current stream waits for ``data``'s copies and
        every copied tensor is recorded on it."""
        found: list[torch.Tensor] = []
        events: dict[int, Any] = {}
        for t in iter_leaves(data):
            entry = self._events.pop(id(t), None)
            if entry is not None and entry[0]() is t:
                found.append(t)
                events[id(entry[1])] = entry[1]
        if not found:
            return data
        stream = self._ops.consumer_stream()
        for event in events.values():
            self._ops.wait(stream, event)
        for t in found:
            # Allocated on the copy stream: without this, freeing it in the step lets the
            # next copy reuse its memory while the step's kernels may still read it.
            self._ops.record_stream(t, stream)
        return data

    def __len__(self) -> int:
        return len(self._events)


class CudaTransport(Transport):
    """Moves batches to ``device`` on a copy stream; see the module docstring.

    Args:
        device: a CUDA device; its index is fixed now.
        max_pinned_bytes: bound on pinned staging memory (default 1 GiB), counted in the
            sizes torch really pins (powers of two); beyond it, pageable memory is used.
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
        if not max_pinned_bytes >= 0:
            raise ValueError(f"{max_pinned_bytes=} must be >= 0 (0: never pin)")
        if ops is None:
            dev = resolve_device(device)
            ops = CudaOps(dev)
        super().__init__(dev)
        self._ops = ops
        self._stream: Any = None  # created on first use (the finalize thread's first post)
        self._stream_lock = threading.Lock()
        self.pinned_pool = PinnedPool(
            ops.pinned,
            max_pinned_bytes,
            done=ops.done,
            synchronize=ops.synchronize,
            empty_cache=ops.empty_host_cache,
        )
        self._handoff = Handoff(ops)
        self.unstaged_copies = 0  # copies from pageable memory the pool did not hand out
        self._count_lock = threading.Lock()  # finalize threads of datasets sharing this

    @property
    def host_allocator(self) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor]:
        """Collate straight into pinned staging memory."""
        return self.pinned_pool

    @property
    def copy_stream(self) -> Any:
        with self._stream_lock:
            if self._stream is None:
                self._stream = self._ops.new_stream()
            return self._stream

    def fetch_multiple(self, batches: list[Any]) -> FetchRequest:
        """Post every batch's copies on the copy stream and return at once (the
        consumer's stream waits for them in :meth:`on_consume`)."""
        stream = self.copy_stream
        pool = self.pinned_pool
        out = []
        for batch in batches:
            keys: list[int] = []

            def move(t: torch.Tensor, keys: list[int] = keys) -> torch.Tensor:
                if t.device == self.device:
                    return t
                k = pool.owns(t)
                if k is None and not pool.is_fallback(t) and not self._ops.is_pinned(t):
                    with self._count_lock:
                        self.unstaged_copies += 1
                moved = self._ops.copy(t, stream)
                if k is not None:
                    keys.append(k)  # only once its copy is posted
                return moved

            try:
                moved = map_leaves(batch, move)
            finally:
                # Also after a failed copy (e.g. out of device memory): the copies posted
                # so far still read their staging buffers.
                event = self._ops.new_event()
                self._ops.record(event, stream)
                pool.in_flight(keys, event)
            self._handoff.register(moved, event)
            out.append(moved)
        return FetchRequest(batches=batches, results=out)

    def on_consume(self, data: Any) -> Any:
        return self._handoff.on_consume(data)

    def memory_stats(self) -> TransportStats:
        pool = self.pinned_pool
        fallbacks = Counter(pool.fallbacks)
        if self.unstaged_copies:
            fallbacks["not_staged"] = self.unstaged_copies
        return TransportStats(
            pinned_bytes_in_use=pool.in_use_bytes,
            pinned_bytes_reserved=pool.reserved_bytes,
            pageable_fallbacks=dict(fallbacks),
        )

    def close(self) -> None:
        """Wait for the posted copies, then drop and unpin the staging buffers (batches
        still held keep theirs until dropped). Usable again afterwards."""
        self.pinned_pool.close()

    def __repr__(self) -> str:
        return f"CudaTransport(device={self.device}, max_pinned_bytes={self.pinned_pool.max_bytes})"
