"""An adversarial CPU stand-in for CUDA, behind the ``CudaOps`` seam of the device transports.

What it models (enough to make the stream protocol's mistakes visible on a CPU):

* streams are queues of operations. The default stream and any stream a test enters are
  *eager*: an operation runs as soon as nothing before it blocks it (a kernel launched on
  an idle GPU). Streams the transports create (``new_stream``: their copy streams) are
  *late*: their work runs only when the test calls :meth:`FakeGPU.pump` (or an event on
  them is synchronized), i.e. copies complete late and out of step with the consumer;
* an event completes when its stream executes the record; ``wait`` blocks a stream until
  the event completes;
* ``copy`` from pinned memory reads the host bytes when it *executes* (DMA), from
  pageable memory when posted (the driver stages it); it never keeps the host tensor
  alive (a real copy does not), so a staging buffer reused too early corrupts the batch;
* device memory comes from a caching allocator: a freed block is reusable at once by its
  allocating stream, and, once ``record_stream`` named other streams, only after the
  work those streams had queued at the free; fresh blocks are filled with 0xFF bytes;
* pinned host memory is kept alive for the whole test (like torch's pinned cache), so a
  late copy from a reused buffer reads the new bytes instead of crashing.

Consumer-side probes: :meth:`FakeGPU.read` (a kernel reading a tensor, e.g. a checksum)
and :meth:`FakeGPU.busy` (a long kernel that ends when the test opens its gate).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from typing import Any

import numpy as np
import torch

from torch_raydata.memory.buffers import Lease

POISON = 0xFF


class FakeEvent:
    def __init__(self) -> None:
        self.recorded = False
        self.done = False


class FakeStream:
    def __init__(self, name: str, late: bool) -> None:
        self.name = name
        self.late = late
        self.ops: deque[tuple[str, Any]] = deque()

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class Gate:
    """A long kernel's end, opened by the test."""

    def __init__(self) -> None:
        self.open = False


class Probe:
    """The result of a :meth:`FakeGPU.read`: set when the read executes on its stream."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None


class _Block:
    def __init__(self, nbytes: int, stream: FakeStream) -> None:
        self.raw = np.full(nbytes, POISON, dtype=np.uint8)
        self.addr = self.raw.ctypes.data
        self.stream = stream
        self.recorded: set[FakeStream] = set()
        self.after: list[FakeEvent] = []


class FakeGPU:
    """Implements ``CudaOps`` (see ``torch_raydata.transports.cuda``) on the CPU."""

    nixl_mem = "DRAM"  # NIXL destination buffers stay host memory on the CPU
    nixl_dev_id = 0

    def __init__(self, device: torch.device | str = "cuda:0", *, late_copies: bool = True) -> None:
        self.device = torch.device(device)
        self.late_copies = late_copies  # False: copy streams run eagerly too (a quiet GPU)
        self.lock = threading.RLock()
        self.default = FakeStream("default", late=False)
        self.streams: list[FakeStream] = [self.default]
        self._current = threading.local()
        self._host: list[torch.Tensor] = []  # every pinned buffer, alive until the test ends
        self._host_ranges: list[tuple[int, int, np.ndarray]] = []
        self._live: dict[int, _Block] = {}  # device address -> block in use
        self._free: list[_Block] = []
        self._self_ref = weakref.ref(self)
        self.fail_pinning = False
        self.fail_copies = False
        self.pinned_bytes = 0
        self.host_cache_emptied = 0
        self.done_hook: Any = None  # called by done() (a test's detector)
        self.copies = 0
        self.device_blocks = 0

    # -- streams and events ------------------------------------------------------------
    def new_stream(self) -> FakeStream:
        with self.lock:
            s = FakeStream(f"copy{len(self.streams)}", late=self.late_copies)
            self.streams.append(s)
            return s

    def eager_stream(self, name: str = "side") -> FakeStream:
        with self.lock:
            s = FakeStream(name, late=False)
            self.streams.append(s)
            return s

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        prev = getattr(self._current, "s", None)
        self._current.s = s
        try:
            yield s
        finally:
            self._current.s = prev

    def consumer_stream(self) -> FakeStream:
        return getattr(self._current, "s", None) or self.default

    def new_event(self) -> FakeEvent:
        return FakeEvent()

    def record(self, event: FakeEvent, stream: FakeStream) -> None:
        event.recorded = True
        self._enqueue(stream, "record", event)

    def wait(self, stream: FakeStream, event: FakeEvent) -> None:
        self._enqueue(stream, "wait", event)

    def done(self, event: FakeEvent) -> bool:
        if self.done_hook is not None:
            self.done_hook(event)
        return not event.recorded or event.done

    def synchronize(self, event: FakeEvent) -> None:
        with self.lock:
            while event.recorded and not event.done:
                if not self._step(late=True):
                    raise AssertionError(f"event can never complete: the GPU is stuck {self}")

    # -- memory ----------------------------------------------------------------------
    def pinned(self, nbytes: int) -> torch.Tensor:
        if self.fail_pinning:
            raise RuntimeError("CUDA error: out of memory (fake: cudaHostAlloc failed)")
        t = torch.full((nbytes,), POISON, dtype=torch.uint8)
        with self.lock:
            self._host.append(t)
            self._host_ranges.append((t.data_ptr(), nbytes, t.numpy()))
            self.pinned_bytes += nbytes
        return t

    def is_pinned(self, t: torch.Tensor) -> bool:
        return self._host_range(t.untyped_storage().data_ptr()) is not None

    def _host_range(self, ptr: int) -> tuple[np.ndarray, int] | None:
        for start, n, arr in self._host_ranges:
            if start <= ptr < start + n:
                return arr, ptr - start
        return None

    def empty_host_cache(self) -> None:
        self.host_cache_emptied += 1

    def device_buffer(self, nbytes: int, stream: Any) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)  # registered with NIXL as DRAM

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def _alloc(self, nbytes: int, stream: FakeStream) -> torch.Tensor:
        with self.lock:
            block = None
            for b in self._free:
                if b.raw.nbytes >= nbytes and b.stream is stream and all(e.done for e in b.after):
                    block = b
                    break
            if block is None:
                block = _Block(max(1, nbytes), stream)
                self.device_blocks += 1
            else:
                self._free.remove(block)
            block.recorded, block.after = set(), []
            self._live[block.addr] = block
        view = np.asarray(Lease(block.raw, block.addr, self._self_ref))[:nbytes]
        return torch.from_numpy(view)

    def _give_back(self, raw: np.ndarray, address: int) -> None:  # a device tensor died
        with self.lock:
            block = self._live.pop(address)
            for s in block.recorded:  # the caching allocator's record_stream events
                e = FakeEvent()
                self.record(e, s)
                block.after.append(e)
            self._free.append(block)

    def record_stream(self, t: torch.Tensor, stream: FakeStream) -> None:
        with self.lock:
            block = self._live.get(t.untyped_storage().data_ptr())
            if block is not None:  # (an empty tensor has no block)
                block.recorded.add(stream)

    def _device_bytes(self, t: torch.Tensor) -> tuple[np.ndarray, int, int]:
        block = self._live[t.untyped_storage().data_ptr()]
        off = t.storage_offset() * t.element_size()
        return block.raw, off, t.numel() * t.element_size()

    # -- work ----------------------------------------------------------------------------
    def copy(self, host: torch.Tensor, stream: FakeStream) -> torch.Tensor:
        if self.fail_copies:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        assert host.is_contiguous()
        nbytes = host.numel() * host.element_size()
        if nbytes == 0:
            return torch.empty(host.shape, dtype=host.dtype)
        dst = self._alloc(nbytes, stream)
        dst_raw, dst_off, _ = self._device_bytes(dst)
        src = self._host_range(host.data_ptr())
        if src is not None:  # pinned: DMA reads the host memory when the copy runs
            arr, off = src
            read = lambda: arr[off : off + nbytes]  # noqa: E731
        else:  # pageable: staged by the driver when posted
            staged = host.contiguous().view(-1).view(torch.uint8).numpy().copy()
            read = lambda: staged  # noqa: E731

        def run() -> None:
            dst_raw[dst_off : dst_off + nbytes] = read()

        with self.lock:
            self.copies += 1
        self._enqueue(stream, "run", run)
        return dst.view(host.dtype).view(host.shape)

    def clone(self, t: torch.Tensor, stream: FakeStream) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        dst = self._alloc(nbytes, stream)
        dst_raw, dst_off, _ = self._device_bytes(dst)
        src = t.contiguous().view(-1).view(torch.uint8)  # a view of the source buffer

        def run() -> None:
            dst_raw[dst_off : dst_off + nbytes] = src.numpy()

        self._enqueue(stream, "run", run)
        return dst.view(t.dtype).view(t.shape)

    def read(self, t: torch.Tensor) -> Probe:
        """A kernel on the current stream reading ``t`` (holds the memory, not ``t``)."""
        raw, off, n = self._device_bytes(t)
        probe = Probe()
        dtype = t.numpy().dtype

        def run() -> None:
            probe.value = raw[off : off + n].copy().view(dtype)

        self._enqueue(self.consumer_stream(), "run", run)
        return probe

    def busy(self) -> Gate:
        """A long kernel on the current stream; it ends when the test sets ``gate.open``."""
        gate = Gate()
        self._enqueue(self.consumer_stream(), "gate", gate)
        return gate

    def _enqueue(self, stream: FakeStream, kind: str, arg: Any) -> None:
        with self.lock:
            stream.ops.append((kind, arg))
            self._settle()

    def _runnable(self, s: FakeStream) -> bool:
        if not s.ops:
            return False
        kind, arg = s.ops[0]
        if kind == "wait":
            return arg.done or not arg.recorded
        if kind == "gate":
            return arg.open
        return True

    def _run_one(self, s: FakeStream) -> None:
        kind, arg = s.ops.popleft()
        if kind == "record":
            arg.done = True
        elif kind == "run":
            arg()

    def _settle(self) -> None:
        """Run eager streams as far as they can go."""
        progress = True
        while progress:
            progress = False
            for s in self.streams:
                while not s.late and self._runnable(s):
                    self._run_one(s)
                    progress = True

    def _step(self, late: bool) -> bool:
        for s in self.streams:
            if (late or not s.late) and self._runnable(s):
                self._run_one(s)
                self._settle()
                return True
        return False

    def pump(self, n: int | None = None) -> int:
        """Run up to ``n`` operations of the late (copy) streams; returns how many ran."""
        ran = 0
        with self.lock:
            self._settle()
            while n is None or ran < n:
                stream = next((s for s in self.streams if s.late and self._runnable(s)), None)
                if stream is None:
                    break
                self._run_one(stream)
                self._settle()
                ran += 1
        return ran

    def open(self, gate: Gate) -> None:
        with self.lock:
            gate.open = True
            self._settle()

    def idle(self) -> bool:
        return all(not s.ops for s in self.streams)

    def __repr__(self) -> str:
        return "FakeGPU(" + ", ".join(f"{s.name}:{len(s.ops)}" for s in self.streams) + ")"
