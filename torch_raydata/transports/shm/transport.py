"""ShmTransport: remote collate in Ray actors on this node, batches in memory both map.

With ``transport="shm"`` the trainer neither resolves blocks nor runs the collate_fn, as
with ``"nixl"``: ``RayIterableDataset`` runs the remote epoch (``transports/nixl/epoch.py``)
and a small pool of collate actors (``worker.py``) collates each planned batch. Here the
actors are pinned to the trainer's node and collate into shared-memory slabs that this
process maps (once per slab), so a batch reaches the training step with no copy in this
process: its tensors are views of the slab, which goes back to the actor when the step
has dropped every one of them (the lease of ``memory/buffers.py``; the release is one byte
written to the slab's header, see ``worker.py``).

Why: the training step's own thread. A loader's threads in the trainer process want its
GIL; this path leaves the trainer two light threads (plan and fetch) that only move small
descriptors. It costs CPU in the actors (one more process per actor, and Ray's task path
per batch), so on a node with few cores it trades rows/s for the step's time:
``docs/performance.md`` (section 4) has the measurements.

Device: ``None``/``"cpu"`` hands out the shared-memory views. A CUDA device copies each
batch out of its slab with :class:`~torch_raydata.transports.CudaTransport` (a copy from
pageable memory: the slab is read before the copy call returns, and is freed then).

Requirements: the actors must be able to run on this node (they reserve
``actor_num_cpus`` each) and this process must be able to open another process's
``/proc/<pid>/fd`` (same user, same PID namespace: Ray's workers on this node are);
otherwise :class:`ShmMapError` says so and names the alternatives.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from typing import Any

import numpy as np
import torch

from ..._checks import check_int, resolve_device
from ...memory.buffers import Lease
from ...pipeline.transport import FetchRequest, Transport, TransportStats
from ..cuda import CudaOps, CudaTransport
from ..nixl.actors import ActorCollate, CollateActors
from ..nixl.common import unflatten_payload
from .worker import FREE, HELD, MAPPED, STATE, ShmBatch, ShmCollateWorker

__all__ = ["ShmMapError", "ShmTransport"]


class ShmMapError(RuntimeError):
    """This process could not map a collate actor's shared memory."""


class _Release:
    """The "pool" of every shm lease: marks the slab free when its batch's last tensor
    dies (``Lease.__del__``, on whichever thread drops it). Stateless, so one for all."""

    @staticmethod
    def _give_back(raw: np.ndarray, address: int) -> None:
        raw[STATE] = FREE


_RELEASE = _Release()
_RELEASE_REF = weakref.ref(_RELEASE)


class ShmTransport(ActorCollate, Transport):
    """Trainer end of remote collate over shared memory; see the module docstring.

    Args:
        device: None/"cpu" (the shared-memory views) or a CUDA device (copied there).
        num_actors: collate actors on this node (started by the first epoch, kept for the
            next ones, killed with the transport).
        actor_num_cpus: CPUs each actor reserves in Ray's scheduler. 0 by default: they are
            this process's helpers, like a DataLoader's worker processes, and must start on
            this node even when its CPUs are all reserved (Ray Train workers), or the
            epoch would wait for them forever.
        chunk: batches an actor collates per Ray call (Ray's cost per call, in this
            process and the actor's, is paid once per chunk; the blocks the chunk shares
            are resolved once). The epoch's bound on batches in flight is
            ``prefetch_batches + chunk * num_actors`` (room for a chunk on every actor).
            A chunk spans blocks while the next block is at hand (a MaterializedDataset's,
            or output Ray has queued) and is cut short rather than wait for the source, so
            it adds no latency when blocks come slowly; an epoch's first chunks are
            smaller (1, 2, 4, ...), for its first batch.
        actor_options: extra ``.options(...)`` for the actors (e.g. ``runtime_env``); the
            node affinity is this transport's.
        ops: the CUDA seam for a CUDA device (tests only).
    """

    needs_thread = True
    name = "shm"
    descriptor = ShmBatch
    #: The remote epoch's fetch thread takes every ready batch at once (nothing to post).
    take_ready = True

    def __init__(
        self,
        device: Any = None,
        *,
        num_actors: int = 2,
        actor_num_cpus: float = 0.0,
        chunk: int = 8,
        actor_options: dict[str, Any] | None = None,
        ops: CudaOps | None = None,
    ) -> None:
        if ops is not None:
            dev = torch.device(device)
        else:
            dev = resolve_device(device, hint=" (the batches then stay in shared memory)")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"ShmTransport delivers to 'cpu' or a CUDA device, got {device=}")
        if not hasattr(os, "memfd_create"):
            raise ValueError(
                "transport='shm' needs Linux (memfd_create); use transport='local' here"
            )
        super().__init__(dev)
        self.num_actors = check_int("num_actors", num_actors, 1)
        self.chunk = check_int("chunk", chunk, 1)
        # RemoteCollate: the epoch's bound is prefetch_batches + this. A chunk's batches come
        # back together, so each actor gets room for a full chunk: with room for one chunk
        # in all, one actor waited while the other worked (W1 rows/s 0.56x; trainer CPU
        # per row 1.27x, from the smaller chunks that fit).
        self.in_flight = self.chunk * self.num_actors
        if not actor_num_cpus >= 0:
            raise ValueError(f"{actor_num_cpus=} must be >= 0")
        self.actor_num_cpus = float(actor_num_cpus)
        self.actor_options = dict(actor_options or {})
        self._cuda = CudaTransport(dev, ops=ops) if dev.type == "cuda" else None
        self._lock = threading.Lock()
        # agent -> slab id -> the whole slab mapped here (uint8). Batches handed out keep
        # their slab's mapping alive through their lease, not through this cache.
        self._maps: dict[str, dict[int, np.ndarray]] = {}
        self.slabs_mapped = 0  # over the transport's life
        self._actors = CollateActors(self)

    # -- RemoteCollate (pipeline/transport.py) --------------------------------------------
    def worker_spec(self) -> tuple[type, dict[str, Any], dict[str, Any]]:
        """How ``actors.py`` starts a collate actor: class, arguments, ``.options``
        (pinned to this process's node: the slabs are this node's memory)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        here = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        return ShmCollateWorker, {}, {"scheduling_strategy": here} | self.actor_options

    def forget(self, agent_names: list[str]) -> None:
        """Drop the mappings of actors that are gone (batches still held keep theirs)."""
        with self._lock:
            for name in agent_names:
                self._maps.pop(name, None)

    # -- mapping ---------------------------------------------------------------------------
    def _slab(self, desc: ShmBatch) -> np.ndarray:
        with self._lock:
            maps = self._maps.setdefault(desc.agent, {})
            for sid in [s for s in maps if s not in desc.live]:
                del maps[sid]  # the actor let it go (it was free: nothing here views it)
            raw = maps.get(desc.slab)
            if raw is not None and raw.nbytes == desc.size:
                return raw
            if not desc.path:
                raise ShmMapError(
                    f"collate actor {desc.agent} sent batch {desc.idx} in slab {desc.slab}, "
                    "which this process has not mapped (the actor closed its descriptor): "
                    "a bug in torch_raydata's shm transport; use transport='local' meanwhile"
                )
            try:
                fd = os.open(desc.path, os.O_RDWR)
            except OSError as e:
                raise ShmMapError(
                    f"transport='shm' could not open collate actor {desc.agent}'s shared "
                    f"memory for batch {desc.idx} ({desc.path}: {e}); the actors must run on "
                    "this node as the same user and PID namespace. Use transport='local' "
                    "(collate on threads here) or transport='nixl'"
                ) from e
            try:
                mm = mmap.mmap(fd, desc.size)
            finally:
                os.close(fd)
            raw = maps[desc.slab] = np.frombuffer(mm, dtype=np.uint8)
            raw[MAPPED] = 1  # the actor may close its descriptor now
            self.slabs_mapped += 1
            return raw

    # -- Transport -----------------------------------------------------------------------
    def fetch_multiple(self, batches: list[Any]) -> FetchRequest:
        """Nothing to post: the bytes are in place. Checked here, built when waited on."""
        self.check_descriptors(batches)
        return FetchRequest(batches=batches)

    def wait_fetch_complete(self, request: FetchRequest, timeout: float | None = None) -> list[Any]:
        """The payloads of ``request``: views of the slabs (or, on CUDA, copies posted on
        the copy stream; the step's stream waits for them in :meth:`on_consume`)."""
        payloads = [self._payload(d) for d in request.batches]
        if self._cuda is None:
            return payloads
        moved = self._cuda.fetch_multiple(payloads)
        del payloads  # read by the copies already posted (pageable): the slabs go back
        return self._cuda.wait_fetch_complete(moved)

    def _payload(self, desc: ShmBatch) -> Any:
        base = None
        if desc.nbytes:
            raw = self._slab(desc)
            raw[STATE] = HELD
            # One lease for the batch: the slab is free again when its last view dies.
            base = np.asarray(Lease(raw, int(raw.ctypes.data), _RELEASE_REF))
        tensors = []
        for spec in desc.tensors:
            if not spec.nbytes or base is None:
                tensors.append(torch.empty(spec.shape, dtype=spec.dtype))
                continue
            flat = base[spec.offset : spec.offset + spec.nbytes]
            tensors.append(torch.from_numpy(flat).view(spec.dtype).view(spec.shape))
        return unflatten_payload(desc.skeleton, tensors)

    def abort(self, request: FetchRequest) -> None:
        """Nothing was posted; slabs of batches never handed out are freed by their actor
        when the next epoch begins."""

    def on_consume(self, data: Any) -> Any:
        return data if self._cuda is None else self._cuda.on_consume(data)

    def memory_stats(self) -> TransportStats:
        return TransportStats() if self._cuda is None else self._cuda.memory_stats()

    def close(self) -> None:
        """Kill the actors and drop every mapping (batches still held keep their slab)."""
        self.forget(self._actors.close())
        with self._lock:
            self._maps.clear()
        if self._cuda is not None:
            self._cuda.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _maps={}, _actors=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._actors = CollateActors(self)  # a copy starts its own

    def __repr__(self) -> str:
        return (
            f"ShmTransport(device={self.device}, num_actors={self.num_actors}, chunk={self.chunk})"
        )
