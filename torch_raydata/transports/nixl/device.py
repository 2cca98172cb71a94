"""The VRAM end of NixlTransport: device clones on a copy stream, event-gated buffer reuse.

Owns: the stream the clones run on, one event per batch recorded after its clones, and
the hand-over to the training step's stream (``transports.cuda.Handoff``). Does not own
the READs or the buffers (``transport.py``, ``pool.py``).

Why: a NIXL READ lands in a VRAM buffer outside any CUDA stream. Each batch is cloned out
of its buffer on this stream (the clones may run late: the stream is the GPU's to
schedule), so the buffer goes back to the pool with the event recorded after the clones
and is READ into again only once that event has completed; the step's current stream
waits on the same event in ``on_consume``, and the clones are recorded on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from ..cuda import Handoff

__all__ = ["DeviceClones"]


class DeviceClones:
    """Clones READ batches on a device stream; see the module docstring.

    Args:
        ops: the CUDA seam (``transports.cuda.CudaOps``, or a test's fake GPU).
    """

    def __init__(self, ops: Any) -> None:
        self.ops = ops
        self.handoff = Handoff(ops)
        self._stream: Any = None  # created on first use (the fetch thread)
        self._lock = threading.Lock()

    @property
    def stream(self) -> Any:
        with self._lock:
            if self._stream is None:
                self._stream = self.ops.new_stream()
            return self._stream

    def clone(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a view of a READ buffer) copied on the stream; queued, not done."""
        return self.ops.clone(t, self.stream)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.ops.empty(shape, dtype)

    def finish(self, payload: Any, release: Callable[[Any], None] | None) -> None:
        """``payload``'s clones are queued: record their event, register it for the
        consumer, and ``release(event)`` the buffer they read (reused once it completed)."""
        event = self.ops.new_event()
        self.ops.record(event, self.stream)
        self.handoff.register(payload, event)
        if release is not None:
            release(event)

    def on_consume(self, data: Any) -> Any:
        return self.handoff.on_consume(data)

    def __getstate__(self) -> dict[str, Any]:
        return {"ops": self.ops}  # a copy in another process starts with its own stream

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["ops"])  # type: ignore[misc]
