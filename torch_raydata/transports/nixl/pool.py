"""The trainer's registered destination buffers for NIXL READs, reused best-fit.

Owns: registering host (DRAM) or device (VRAM) buffers with the trainer's NIXL agent,
handing a buffer out as a flat uint8 view that comes back when the last tensor viewing it
is collected (the lease of ``memory/buffers.py``), trimming free memory beyond
``max_free_bytes``, and deregistering everything on close. Does not own the agent or the
transfers (``transport.py``).

VRAM buffers are read by asynchronous device clones (``transport.py``), while the next
NIXL READ into a buffer runs outside any CUDA stream: a buffer released with an event
(recorded after its clones) is reused only once that event has completed (checked at
each :meth:`acquire`, waited for at :meth:`close`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import numpy as np
import torch

from ...memory.buffers import Lease
from .common import align

__all__ = ["DestPool"]

logger = logging.getLogger(__name__)

_QUANTUM = 1 << 16  # destination buffers are sized in 64 KiB steps


class DestPool:
    """Registered destination buffers, reused best-fit; see the module docstring.

    Buffers come back through :meth:`release` (copy mode, or after an error) or through a
    lease when the last tensor viewing one is collected; lease returns are only queued
    (any thread) and taken in on the next :meth:`acquire` (the fetch thread).
    """

    def __init__(
        self, agent: Any, device: torch.device, max_free_bytes: int, ops: Any = None
    ) -> None:
        self._agent = agent
        self.device = device
        self._ops = ops  # CudaOps (the device seam) for a CUDA device
        self.mem = ops.nixl_mem if device.type == "cuda" else "DRAM"
        self.dev_id = ops.nixl_dev_id if device.type == "cuda" else 0
        self.max_free_bytes = max_free_bytes
        self._lock = threading.Lock()
        self._free: list[Any] = []
        self._returned: list[Any] = []
        self._pending: list[tuple[Any, Any]] = []  # (buffer, event): device clones may read it
        self._regs: dict[int, tuple[Any, Any]] = {}  # address -> (buffer, registration)
        self._self_ref = weakref.ref(self)
        self._closed = False
        self.registrations = 0

    @staticmethod
    def addr(raw: Any) -> int:
        return int(raw.ctypes.data) if isinstance(raw, np.ndarray) else int(raw.data_ptr())

    @staticmethod
    def size(raw: Any) -> int:
        return int(raw.nbytes) if isinstance(raw, np.ndarray) else int(raw.numel())

    def acquire(self, nbytes: int, stream: Any = None) -> Any:
        """A registered buffer of at least ``nbytes`` (a VRAM one allocated on ``stream``)."""
        with self._lock:
            self._free.extend(self._returned)
            self._returned.clear()
            if self._pending:  # by flag, not `in`: `==` on tensors compares elements
                still = []
                for raw, event in self._pending:
                    if self._ops.done(event):
                        self._free.append(raw)
                    else:
                        still.append((raw, event))
                self._pending = still
            fits = [i for i, r in enumerate(self._free) if self.size(r) >= nbytes]
            if fits:  # best fit (by position: `==` on arrays compares elements)
                return self._free.pop(min(fits, key=lambda i: self.size(self._free[i])))
        size = max(_QUANTUM, align(nbytes, _QUANTUM))
        raw: Any
        if self.device.type == "cpu":
            raw = np.empty(size, dtype=np.uint8)
        else:
            raw = self._ops.device_buffer(size, stream)
        reg = self._agent.register_memory([(self.addr(raw), size, self.dev_id, "")], self.mem)
        self._regs[self.addr(raw)] = (raw, reg)
        self.registrations += 1
        return raw

    def release(self, raw: Any, event: Any = None) -> None:
        """``raw`` may be reused: now, or (``event``) once that event has completed."""
        with self._lock:
            if self._closed:
                return
            if event is not None:
                self._pending.append((raw, event))
                return
            self._free.append(raw)
            extra = sum(self.size(r) for r in self._free) - self.max_free_bytes
            trim = []
            self._free.sort(key=self.size)
            while extra > 0 and self._free:
                trim.append(self._free.pop(0))  # smallest first
                extra -= self.size(trim[-1])
        for r in trim:
            self._deregister(r)

    def _give_back(self, raw: np.ndarray, address: int) -> None:  # by a Lease, any thread
        with self._lock:
            if not self._closed:
                self._returned.append(raw)

    def handout(self, raw: np.ndarray) -> np.ndarray:
        """A flat uint8 view of ``raw`` that returns it here once nothing views it."""
        return np.asarray(Lease(raw, self.addr(raw), self._self_ref))  # type: ignore[arg-type]

    def _deregister(self, raw: Any) -> None:
        entry = self._regs.pop(self.addr(raw), None)
        if entry is not None:
            self._agent.deregister_memory(entry[1])

    @property
    def free_buffers(self) -> int:
        return len(self._free) + len(self._returned)

    @property
    def pending_buffers(self) -> int:
        """Buffers waiting for the device clones that read them."""
        return len(self._pending)

    @property
    def registered(self) -> int:
        return len(self._regs)

    def close(self) -> None:
        """Wait for the clones reading any buffer, then deregister every buffer. Tensors
        still viewing one stay valid (numpy owns the memory); their leases return to a
        closed pool and are dropped."""
        try:
            with self._lock:
                pending = [event for _, event in self._pending]
            for event in pending:
                self._ops.synchronize(event)
        finally:
            with self._lock:
                self._closed = True
                self._free.clear()
                self._returned.clear()
                self._pending.clear()
                regs = list(self._regs.values())
                self._regs.clear()
        for _raw, reg in regs:
            try:
                self._agent.deregister_memory(reg)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                logger.warning("torch_raydata: NIXL deregister failed", exc_info=True)
