"""The collate actor of the shm transport: collate into memory the trainer maps.

Each slab is an anonymous shared-memory file (``memfd_create``), mapped here and, by the
trainer, through ``/proc/<actor pid>/fd/<fd>``: it has no name in ``/dev/shm``, so nothing
is left behind when either process dies (the kernel frees it with its last mapping).

A slab's first byte (of a 64-byte header) is its state, and each transition is made by
the side that owns the slab in the state it leaves, so the two processes need no lock
and no message:

    FREE     --actor reserves it for a batch-->              WRITTEN
    WRITTEN  --trainer hands the batch out (fetch thread)--> HELD
    HELD     --the batch's last tensor dies (trainer)-->     FREE
    WRITTEN  --actor: collate failed, or a newer epoch began and nobody took it--> FREE

The header's second byte is set by the trainer once it has mapped the slab: the actor
then closes its file descriptor (the mapping keeps the memory), so a step that holds
many batches holds no descriptors here, and later batches in that slab carry no path.

A batch held by the training step keeps its slab (across epochs too); the actor makes a
new slab when no free one fits, so holding batches never blocks the actors (their memory
is the step's, as with any loader). Free slabs beyond ``max_slabs`` are unmapped.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..nixl.common import ALIGN, RemoteBatch, align
from ..nixl.worker import Slab, SlabWorker

__all__ = ["FREE", "HEADER", "HELD", "MAPPED", "STATE", "ShmBatch", "ShmCollateWorker", "WRITTEN"]

FREE, WRITTEN, HELD = 0, 1, 2
STATE, MAPPED = 0, 1  # header bytes: the state above; 1 once the trainer mapped the slab
HEADER = ALIGN  # bytes before a slab's data: the state byte, then padding
_QUANTUM = 1 << 16


@dataclass(frozen=True)
class ShmBatch(RemoteBatch):
    """A :class:`RemoteBatch` whose bytes are in the actor's slab ``slab``, a shared-memory
    file the trainer opens at ``path`` (``size`` bytes; "" once the trainer mapped it). ``live``: the actor's slabs now,
    so the trainer forgets the mappings of slabs the actor has let go."""

    path: str = ""
    size: int = 0
    live: tuple[int, ...] = ()


@dataclass(eq=False)
class _Slab(Slab):
    fd: int = -1  # closed once the trainer has mapped the slab
    mm: mmap.mmap | None = None

    @property
    def state(self) -> int:
        return int(self.raw[STATE])

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ShmCollateWorker(SlabWorker):
    """Body of one shm collate actor (see the module docstring).

    Args:
        name: the actor's name (unique; in messages).
        collate_fn: ``pyarrow.Table -> batch`` (pickled to the actor).
        id_column: column whose values travel with each batch (exact resume).
        max_slabs: free slabs kept mapped for reuse.
    """

    DATA_START = HEADER

    def _new_slab(self, nbytes: int) -> _Slab:
        size = max(_QUANTUM, align(nbytes, _QUANTUM))
        fd = os.memfd_create(f"trd-{self.name}-{self._next_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        slab = _Slab(self._next_id, np.frombuffer(mm, dtype=np.uint8), fd=fd, mm=mm)
        self._next_id += 1
        self._slabs[slab.id] = slab
        self.allocations += 1
        return slab

    def _drop(self, slab: _Slab) -> None:
        """Unmap a free slab (the trainer's mapping, if any, keeps the memory alive)."""
        del self._slabs[slab.id]
        slab.raw = None  # type: ignore[assignment]
        try:
            if slab.mm is not None:
                slab.mm.close()
        except BufferError:  # a view is still alive here: the mapping goes with it
            pass
        slab.close_fd()

    def _reserve(self, nbytes: int) -> _Slab | None:
        if nbytes <= 0:
            return None
        with self._cond:
            free = [s for s in self._slabs.values() if s.state == FREE and s.size >= nbytes]
            slab = min(free, key=lambda s: s.size) if free else self._new_slab(nbytes)
            slab.raw[STATE] = WRITTEN
            for s in self._slabs.values():
                if s.fd >= 0 and s.raw[MAPPED]:
                    s.close_fd()  # the trainer has its own mapping
            self._trim()
        return slab

    def _unreserve(self, slab: _Slab | None) -> None:
        if slab is not None:
            with self._cond:
                slab.raw[STATE] = FREE
                self._trim()

    def _trim(self) -> None:
        """Keep at most ``max_slabs`` free slabs, dropping the smallest first: batch sizes
        only grow within an epoch (the last, partial batch fits a larger one)."""
        free = sorted((s for s in self._slabs.values() if s.state == FREE), key=lambda s: s.size)
        for s in free[: max(0, len(free) - self.max_slabs)]:
            self._drop(s)

    def _new_generation(self) -> None:
        # Batches of the closed epochs that the trainer never took (WRITTEN) are gone with
        # that epoch; the ones it handed out (HELD) are freed by the trainer when they die.
        for slab in self._slabs.values():
            if slab.state == WRITTEN:
                slab.raw[STATE] = FREE

    def _describe(self, slab: _Slab | None, **fields: Any) -> ShmBatch:
        with self._cond:
            live = tuple(self._slabs)
        return ShmBatch(
            agent=self.name,
            md_version=0,
            metadata=b"",
            slab=slab.id if slab is not None else -1,
            addr=0,
            path=f"/proc/{os.getpid()}/fd/{slab.fd}" if slab is not None and slab.fd >= 0 else "",
            size=slab.size if slab is not None else 0,
            live=live,
            **fields,
        )

    def stats(self) -> dict[str, int]:
        with self._cond:
            states = [s.state for s in self._slabs.values()]
            fds = sum(s.fd >= 0 for s in self._slabs.values())
        return {
            "slabs": len(states),
            "fds": fds,
            "free": states.count(FREE),
            "written": states.count(WRITTEN),
            "held": states.count(HELD),
            "allocations": self.allocations,
            "generation": self.generation,
            "pid": os.getpid(),
        }

    def close(self) -> None:
        """Unmap every free slab (tests; an actor just dies)."""
        with self._cond:
            for slab in [s for s in self._slabs.values() if s.state == FREE]:
                self._drop(slab)
