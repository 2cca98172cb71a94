"""The collate actor of the NIXL transport: collate next to the data, into registered memory.

``SlabWorker`` is what any remote collate actor does whatever carries its memory (this
module's NIXL actor, and ``transports/shm``'s shared-memory one): resolve a plan, collate
into a slab, describe it. ``CollateWorker`` adds the NIXL agent and its slabs.

Owns, in one Ray actor process: a NIXL agent, a pool of registered source buffers
("slabs"), and running the collate_fn so its output lands in a slab. ``epoch.py``
makes this class a Ray actor and calls :meth:`CollateWorker.collate` with a batch plan;
the trainer's :class:`~torch_raydata.transports.nixl.NixlTransport` READs the slab.

One batch, in the actor (method calls run one at a time):

    1. resolve the plan's block pieces (``ray.get``, zero-copy from this node's object store)
    2. reserve a slab at least as large as the last batch needed (a slab is free again once
       the trainer's notification says its READ completed)
    3. collate: DefaultCollate/PadCollate write straight into the slab (their ``allocator``
       is pointed at it); any other tensor (a user collate_fn's, or an overflow) is copied
       in afterwards, into a larger slab if needed
    4. return a :class:`RemoteBatch` descriptor; the slab stays busy until its notification

Progress: NIXL's own progress thread is off (it spins); a small thread here progresses the
agent (connection set-up needs it) and takes the notifications, every 0.5 ms while a slab
is busy (a release may come), every 5 ms otherwise.

Slabs: sized to the batch rounded up to 64 KiB, reused best-fit. At most ``max_slabs`` are
busy at once (the trainer's in-flight bound, plus slack for notifications still on the
wire); beyond that the actor waits for a notification, up to ``notif_timeout`` seconds.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...collate import DefaultCollate, PadCollate
from .common import (
    RemoteBatch,
    TensorSpec,
    align,
    flatten_payload,
    import_nixl,
    released_slabs,
)

__all__ = ["CollateFailure", "CollateWorker", "Slab", "SlabWorker", "with_allocator"]

_SLAB_QUANTUM = 1 << 16
# The agent is progressed by a small Python thread instead of NIXL's progress thread, which
# spins (~0.35 CPU-s per second measured idle here). This side must progress for the UCX
# wire-up and to receive notifications (a READ that carried its notification waited on it:
# 0.1 GB/s polled every 10 ms, vs 4.8 GB/s for a READ without one, so the trainer sends
# releases separately); polling every 0.5-1 ms cost 5-8% of a core here.
_PROGRESS_BUSY = 0.0005
_PROGRESS_IDLE = 0.005


@dataclass(eq=False)
class Slab:
    """One buffer a collate actor writes batches into: ``raw`` (uint8) spans all of it."""

    id: int
    raw: np.ndarray

    @property
    def base(self) -> int:
        return int(self.raw.ctypes.data)

    @property
    def size(self) -> int:
        return int(self.raw.nbytes)


@dataclass(eq=False)
class _Slab(Slab):
    reg: Any = None  # the NIXL registration
    busy: bool = False


def with_allocator(fn: Any, allocator: Any) -> Any:
    """A copy of ``fn`` that allocates its output tensors with ``allocator``, when ``fn`` is
    one of ours (DefaultCollate, PadCollate); any other callable is returned as is."""
    if isinstance(fn, DefaultCollate):
        fn = copy.copy(fn)
        fn.allocator = allocator
    elif type(fn) is PadCollate:  # a subclass may take other arguments: used as is
        fn = PadCollate(
            fn.columns,
            fn.pad_value,
            fn.max_length,
            fn.pad_to_multiple_of,
            dtypes=fn.dtypes,
            allocator=allocator,
        )
    return fn


class CollateFailure:
    """A plan's collate raised (in :meth:`SlabWorker.collate_many`): the exception travels
    as this value in the batch's place, and the trainer raises it for that batch."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    @classmethod
    def of(cls, e: BaseException) -> CollateFailure:
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001 - keep the type's name and the message
            e = RuntimeError(f"{type(e).__name__}: {e}")
        return cls(e)


class SlabWorker:
    """What every remote collate actor does, whatever carries its memory to the trainer:
    resolve a plan's pieces, collate into a slab (``_allocate``/``_pack``), describe it.

    Subclasses own the slabs: :meth:`_reserve`/:meth:`_unreserve` (a slab for one batch),
    :meth:`_new_generation` (an older epoch is closed: free what it left busy) and
    :meth:`_describe` (the descriptor the trainer gets). ``DATA_START``: the first byte of
    a slab the collate may use (a shared-memory slab keeps its state byte before it).
    """

    DATA_START = 0

    def __init__(
        self,
        name: str,
        collate_fn: Any,
        *,
        id_column: str | None = None,
        max_slabs: int = 8,
    ) -> None:
        self.name = name
        # Guards the slabs (a subclass may touch them from a thread of its own).
        self._cond = threading.Condition()
        self.fn = with_allocator(collate_fn, self._allocate)
        self.id_column = id_column
        self.max_slabs = max_slabs
        self._slabs: dict[int, Any] = {}
        self._next_id = 0
        self._expected = 0  # bytes the last batch needed
        self._cur: Any = None  # slab the allocator bump-allocates from
        self._used = 0
        self.allocations = 0  # slabs made over the actor's life
        self.generation = 0  # the epoch whose plans this actor collates (see _begin)

    def ready(self) -> str:
        return self.name

    # -- what a subclass provides ----------------------------------------------------------
    def _reserve(self, nbytes: int) -> Any:
        """A slab of at least ``nbytes`` for one batch, marked busy; None when 0."""
        raise NotImplementedError

    def _unreserve(self, slab: Any) -> None:
        raise NotImplementedError

    def _new_generation(self) -> None:
        """The first call of a newer epoch: the older ones are closed (lock held)."""
        raise NotImplementedError

    def _describe(self, slab: Any, **fields: Any) -> RemoteBatch:
        raise NotImplementedError

    # -- one batch -------------------------------------------------------------------------
    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The collate_fn's allocator: the next aligned piece of the current slab, or plain
        memory when it does not fit (copied into a larger slab after the collate)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        slab = self._cur
        off = align(self._used)
        if slab is None or off + nbytes > slab.size:
            return torch.empty(shape, dtype=dtype)
        self._used = off + nbytes
        return torch.from_numpy(slab.raw[off : off + nbytes]).view(dtype).view(shape)

    def _pack(
        self, slab: _Slab | None, tensors: list[torch.Tensor]
    ) -> tuple[_Slab | None, list[TensorSpec], int]:
        """Place every tensor in ``slab`` (moving everything to a larger one if needed).
        Returns the slab, one spec per tensor and the bytes to READ."""
        specs: list[TensorSpec | None] = [None] * len(tensors)
        outside: list[int] = []
        used = self._used if slab is not None else self.DATA_START
        for i, t in enumerate(tensors):
            n = t.numel() * t.element_size()
            if n == 0:  # no bytes to place (the trainer makes an empty tensor)
                specs[i] = TensorSpec(0, 0, t.dtype, tuple(t.shape))
                continue
            ptr = t.data_ptr()
            if (
                slab is not None
                and t.is_contiguous()
                and slab.base <= ptr
                and ptr + n <= slab.base + slab.size
            ):
                specs[i] = TensorSpec(ptr - slab.base, n, t.dtype, tuple(t.shape))
            else:
                outside.append(i)
        if outside:
            extra = sum(align(tensors[i].numel() * tensors[i].element_size()) for i in outside)
            if slab is None or align(used) + extra > slab.size:
                # Too big for this slab: repack everything into one that fits.
                total = sum(align(t.numel() * t.element_size()) for t in tensors)
                new = self._reserve(total)
                self._unreserve(slab)
                slab, used, outside = new, self.DATA_START, list(range(len(tensors)))
                self._cur = slab  # freed by collate() if anything below raises
            assert slab is not None
            for i in outside:
                t = tensors[i]
                n = t.numel() * t.element_size()
                off = align(used)
                torch.from_numpy(slab.raw[off : off + n]).view(t.dtype).view(t.shape).copy_(t)
                specs[i] = TensorSpec(off, n, t.dtype, tuple(t.shape))
                used = off + n
        # Zero-size tensors need no bytes: a batch of only those has nothing to move.
        nbytes = max((s.offset + s.nbytes for s in specs if s is not None and s.nbytes), default=0)
        return slab, [s for s in specs if s is not None], nbytes

    # -- epochs ----------------------------------------------------------------------------
    def _begin(self, generation: int) -> bool:
        """Whether a call of epoch ``generation`` should run. The actor outlives epochs: the
        first call of a newer epoch frees every slab (the trainer closed the older epochs
        first, so none of their READs is still posted, and an abandoned batch's slab would
        otherwise stay busy for good); a call of an older epoch is skipped (a plan that
        epoch's close left queued; Ray runs one caller's calls in order, so only if not)."""
        if generation == self.generation:
            return True
        if generation < self.generation:
            return False
        with self._cond:
            self._new_generation()
            self._cond.notify_all()
        self.generation = generation
        return True

    # -- one batch -------------------------------------------------------------------------
    def collate(self, plan: Any, generation: int = 0) -> RemoteBatch | None:
        """Collate ``plan`` into a slab; None for a plan of an epoch already over."""
        if not self._begin(generation):
            return None
        return self._collate(plan, None)

    def collate_many(self, plans: list[Any], generation: int = 0) -> tuple[Any, ...]:
        """Several plans in one call, their descriptors in one tuple: the blocks they
        share are resolved once, and a plan that fails is a :class:`CollateFailure`
        in its place, so the trainer names the right batch and gets the ones before it.
        Ray's cost per call (submit, schedule, return) is then paid once per chunk."""
        if not self._begin(generation):
            return (None,) * len(plans)
        import ray

        refs = list(dict.fromkeys(r for p in plans for r in p.refs))  # ObjectRefs hash by id
        resolved = dict(zip(refs, ray.get(refs), strict=True))
        get = lambda rs: [resolved[r] for r in rs]  # noqa: E731
        out: list[Any] = []
        for plan in plans:
            try:
                out.append(self._collate(plan, get))
            except Exception as e:  # noqa: BLE001 - returned in the batch's place
                out.append(CollateFailure.of(e))
        return tuple(out)

    def _collate(self, plan: Any, get: Any) -> RemoteBatch:
        t0 = time.perf_counter()
        table, ids = plan.materialize(self.id_column, get=get)
        slab = self._reserve(self._expected)
        self._cur, self._used = slab, self.DATA_START
        try:
            payload = self.fn(table)
            if payload is None:
                raise TypeError(
                    f"collate_fn {self.fn!r} returned None for batch {plan.idx}; it must "
                    "return the collated batch"
                )
            skeleton, tensors = flatten_payload(payload)
            del payload, table
            slab, specs, nbytes = self._pack(slab, tensors)
        except BaseException:
            self._unreserve(self._cur)
            raise
        finally:
            self._cur = None
        del tensors
        if slab is not None and nbytes == 0:  # nothing to READ: no confirmation will come
            self._unreserve(slab)
            slab = None
        self._expected = nbytes
        return self._describe(
            slab,
            idx=plan.idx,
            nbytes=nbytes,
            tensors=tuple(specs),
            skeleton=skeleton,
            num_rows=plan.num_rows,
            ids=ids,
            seconds=time.perf_counter() - t0,
        )


class CollateWorker(SlabWorker):
    """Body of one NIXL collate actor (see the module docstring).

    Args:
        name: the NIXL agent name (unique per actor).
        collate_fn: ``pyarrow.Table -> batch`` (pickled to the actor).
        id_column: column whose values travel with each batch (exact resume).
        backends: NIXL backends for the agent.
        max_slabs: bound on busy slabs.
        notif_timeout: seconds to wait for a READ confirmation when every slab is busy.
    """

    def __init__(
        self,
        name: str,
        collate_fn: Any,
        *,
        id_column: str | None = None,
        backends: tuple[str, ...] = ("UCX",),
        max_slabs: int = 8,
        notif_timeout: float = 60.0,
    ) -> None:
        nixl_agent, nixl_agent_config = import_nixl()
        # This process is ours: keep nixl's per-agent INFO lines out of the worker logs.
        logging.getLogger("nixl").setLevel(logging.WARNING)
        super().__init__(name, collate_fn, id_column=id_column, max_slabs=max_slabs)
        self.agent = nixl_agent(
            name, nixl_agent_config(enable_prog_thread=False, backends=list(backends))
        )
        self._stop = threading.Event()
        self.notif_timeout = notif_timeout
        self.md_version = 0
        self._md = self.agent.get_agent_metadata()
        self._progress = threading.Thread(
            target=self._progress_loop, name="trd-nixl-progress", daemon=True
        )
        self._progress.start()

    # -- progress ------------------------------------------------------------------------
    def _progress_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                if self._poll():
                    self._cond.notify_all()
                busy = any(s.busy for s in self._slabs.values())
            self._stop.wait(_PROGRESS_BUSY if busy else _PROGRESS_IDLE)

    def _poll(self) -> int:
        """Progress the agent and free the slabs whose READ completed (lock held)."""
        freed = 0
        for msgs in self.agent.get_new_notifs().values():
            for msg in msgs:
                for sid in released_slabs(msg):
                    slab = self._slabs.get(sid)
                    if slab is not None and slab.busy:
                        slab.busy = False
                        freed += 1
        return freed

    def close(self) -> None:
        """Stop the progress thread and deregister every slab (tests; an actor just dies)."""
        self._stop.set()
        if self._progress.is_alive():
            self._progress.join()
        with self._cond:
            for slab in list(self._slabs.values()):
                self._drop(slab)

    # -- slabs ---------------------------------------------------------------------------

    def _register(self, nbytes: int) -> _Slab:
        size = max(_SLAB_QUANTUM, align(nbytes, _SLAB_QUANTUM))
        # Free slabs too small for this size are dropped: batch sizes only grow here (the
        # last, partial batch takes a larger free slab, best fit).
        for slab in [s for s in self._slabs.values() if not s.busy and s.size < size]:
            self._drop(slab)
        raw = np.empty(size, dtype=np.uint8)
        reg = self.agent.register_memory([(int(raw.ctypes.data), size, 0, "")], "DRAM")
        slab = _Slab(self._next_id, raw, reg)
        self._next_id += 1
        self._slabs[slab.id] = slab
        self._changed()
        self.allocations += 1
        return slab

    def _drop(self, slab: _Slab) -> None:
        del self._slabs[slab.id]
        self.agent.deregister_memory(slab.reg)
        self._changed()

    def _changed(self) -> None:
        self.md_version += 1
        self._md = self.agent.get_agent_metadata()

    def _reserve(self, nbytes: int) -> _Slab | None:
        """A free slab of at least ``nbytes``, marked busy; None when ``nbytes`` is 0."""
        if nbytes <= 0:
            return None
        deadline = None
        with self._cond:
            while True:
                self._poll()
                free = [s for s in self._slabs.values() if not s.busy and s.size >= nbytes]
                if free:
                    slab = min(free, key=lambda s: s.size)
                    break
                busy = sum(s.busy for s in self._slabs.values())
                if busy < self.max_slabs:
                    slab = self._register(nbytes)
                    break
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.notif_timeout
                elif now > deadline:
                    raise TimeoutError(
                        f"collate actor {self.name}: all {busy} buffers are still waiting for "
                        f"the trainer's READ confirmation after {self.notif_timeout:.0f}s"
                    )
                self._cond.wait(_PROGRESS_IDLE)  # the progress thread notifies on a free
            slab.busy = True
        return slab

    def _unreserve(self, slab: _Slab | None) -> None:
        if slab is not None:
            with self._cond:
                slab.busy = False

    def _new_generation(self) -> None:
        # The trainer READ (or abandoned) every batch of the closed epochs: all slabs free.
        for slab in self._slabs.values():
            slab.busy = False

    def _describe(self, slab: _Slab | None, **fields: Any) -> RemoteBatch:
        with self._cond:
            md_version, metadata = self.md_version, self._md
        return RemoteBatch(
            agent=self.name,
            md_version=md_version,
            metadata=metadata,
            slab=slab.id if slab is not None else -1,
            addr=slab.base if slab is not None else 0,
            **fields,
        )

    def stats(self) -> dict[str, int]:
        with self._cond:
            self._poll()
            return {
                "slabs": len(self._slabs),
                "busy": sum(s.busy for s in self._slabs.values()),
                "allocations": self.allocations,
                "generation": self.generation,
                "pid": os.getpid(),
            }
