"""NixlTransport: remote collate in Ray actors, one-sided NIXL READs into the trainer.

With ``transport="nixl"`` the trainer process never ``ray.get``-s a block and never runs
the collate_fn: ``RayIterableDataset`` runs the *remote* epoch (``epoch.py``),
which plans batches from block metadata and sends each plan to a small pool of collate
actors (``worker.py``), started by the first epoch and kept until this transport closes
or is garbage-collected (``actors.py``). An actor collates next to the data into memory
registered with its NIXL agent and returns a small :class:`RemoteBatch` descriptor. This
module is the trainer's end:

* one NIXL agent (created on first use, UCX backend) and a pool of registered destination
  buffers (DRAM on CPU runs; VRAM for a CUDA device);
* ``fetch_multiple(descriptors)`` posts one READ per batch for all of them and returns at
  once; ``wait_fetch_complete(request, timeout)`` polls them until DONE or ERR (the
  upstream Ray #61773 pattern). Once they are done, one notification per actor names the
  source buffers it may reuse (not carried by the READ itself: a READ with a notification
  completes only once the actor has progressed, 0.1 vs 4.8 GB/s measured here);
* the payload handed on owns its memory: its tensors are views of the destination buffer,
  which returns to the pool when the training step has dropped every one of them (the
  lease of ``memory/buffers.py``), so an in-place update by the step is safe and costs
  no copy. ``copy=True`` instead clones once and reuses the buffer at once.
* on a CUDA device (VRAM destinations) each batch is cloned out of its buffer on a copy
  stream, and the buffer is READ into again only once the clones have run; the step's
  stream waits for them in :meth:`on_consume` (``device.py``).

Errors: a READ in ERR, a remote agent gone (actor death) or no completion within
``xfer_timeout`` seconds raise :class:`NixlTransferError` naming the batch; posted READs
are released (NIXL cancels them) by :meth:`abort`. A buffer whose READ could not be
cancelled is never reused (held until :meth:`close`).

Ray's own NIXL tensor transport (``@ray.method(tensor_transport="nixl")``) is not used:
on Ray 2.60 a second multi-ref ``ray.get`` fails with NIXL_ERR_NOT_FOUND (measured here),
so this module drives ``nixl_agent`` directly.

Threads: NIXL calls are made from the remote epoch's fetch thread, and from
:meth:`forget`/:meth:`close` after it is joined; a lock serialises them anyway. Lease
returns (any thread, from garbage collection) only append to a list.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..._checks import check_int, resolve_device
from ...pipeline.transport import FetchRequest, Transport
from ..cuda import CudaOps
from .actors import ActorCollate, CollateActors
from .common import RemoteBatch, import_nixl, release_message, unflatten_payload
from .device import DeviceClones
from .pool import DestPool
from .worker import CollateWorker

__all__ = ["NixlTransport", "NixlTransferError"]

logger = logging.getLogger(__name__)

_SPIN = 2e-5  # first sleep between polls of a posted READ; doubles up to _MAX_SPIN
_MAX_SPIN = 1e-3


class NixlTransferError(RuntimeError):
    """A NIXL READ of a batch failed, timed out, or its source is gone."""


@dataclass
class _Xfer:
    desc: RemoteBatch
    raw: Any = None  # destination buffer (None: nothing to READ)
    handle: Any = None
    done: bool = False
    posted_at: float = 0.0
    release: bool = False  # the source slab may be reused: tell its actor


class NixlTransport(ActorCollate, Transport):
    """Trainer end of remote collate over NIXL; see the module docstring.

    Args:
        device: None/"cpu" (DRAM destinations) or a CUDA device (VRAM destinations).
        num_actors: collate actors (started by the first epoch, kept for the next ones).
        actor_num_cpus: CPUs each actor reserves in Ray's scheduler (small, so the actors
            never starve the Dataset's own tasks).
        in_flight: READs posted together (one per batch) before waiting on them; also the
            number of batches the remote epoch collects before posting.
        xfer_timeout: seconds a posted READ may take before it is aborted with an error
            (also how long an actor waits for a READ confirmation).
        copy: clone each batch out of the destination buffer (and reuse the buffer at once)
            instead of handing out views that return it when dropped.
        backends: NIXL backends of the agents.
        max_free_bytes: free destination memory kept registered for reuse.
        actor_options: extra ``.options(...)`` for the collate actors (e.g. a
            ``scheduling_strategy`` or ``runtime_env``).
        ops: the CUDA seam for a CUDA device (tests only).
    """

    needs_thread = True
    name = "nixl"
    descriptor = RemoteBatch

    def __init__(
        self,
        device: Any = None,
        *,
        num_actors: int = 2,
        actor_num_cpus: float = 0.25,
        in_flight: int = 4,
        xfer_timeout: float = 60.0,
        copy: bool = False,
        backends: tuple[str, ...] = ("UCX",),
        max_free_bytes: int = 1 << 30,
        actor_options: dict[str, Any] | None = None,
        ops: CudaOps | None = None,
    ) -> None:
        import_nixl()  # fail at construction, naming the extra
        if ops is not None:
            dev = torch.device(device)
        else:
            dev = resolve_device(device, hint=" (NIXL then READs into host DRAM)")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(
                f"NixlTransport moves batches to 'cpu' or a CUDA device, got {device=}"
            )
        super().__init__(dev)
        num_actors = check_int("num_actors", num_actors, 1)
        in_flight = check_int("in_flight", in_flight, 1)
        if not actor_num_cpus >= 0:
            raise ValueError(f"{actor_num_cpus=} must be >= 0")
        if not xfer_timeout > 0:
            raise ValueError(f"{xfer_timeout=} must be > 0 seconds")
        self.num_actors = num_actors
        self.actor_num_cpus = float(actor_num_cpus)
        self.in_flight = in_flight
        self.xfer_timeout = float(xfer_timeout)
        # VRAM buffers have no lease mechanism (torch storages have no "last view died"
        # hook): on CUDA each batch is cloned on the device, and the buffer reused once
        # the clones are done (see the module docstring).
        self.copy = bool(copy) or dev.type == "cuda"
        self._ops = (ops or CudaOps(dev)) if dev.type == "cuda" else None
        self._device = DeviceClones(self._ops) if self._ops is not None else None
        self.backends = tuple(backends)
        self.max_free_bytes = max_free_bytes
        self.actor_options = dict(actor_options or {})
        self._lock = threading.RLock()
        self._agent: Any = None
        self._pool: DestPool | None = None
        self._loaded: dict[str, int] = {}  # remote agent -> metadata version loaded
        self._stuck: list[Any] = []  # buffers whose READ could not be cancelled
        self.reads_posted = 0
        self.reads_done = 0
        self.bytes_read = 0
        # Killed on close() or when this transport is garbage-collected.
        self._actors = CollateActors(self)

    # -- agent -----------------------------------------------------------------------------
    @property
    def agent(self) -> Any:
        with self._lock:
            if self._agent is None:
                nixl_agent, nixl_agent_config = import_nixl()
                name = f"trd-trainer-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                # No progress thread here: it spins (~0.35 CPU-s per second measured idle),
                # and this agent only initiates READs, which polling them progresses.
                config = nixl_agent_config(enable_prog_thread=False, backends=list(self.backends))
                self._agent = nixl_agent(name, config)
                self._pool = DestPool(self._agent, self.device, self.max_free_bytes, self._ops)
            return self._agent

    @property
    def copy_stream(self) -> Any:
        """The stream of the device clones (None for host destinations)."""
        return self._device.stream if self._device is not None else None

    @property
    def pool(self) -> DestPool:
        self.agent  # noqa: B018 - creates the pool with the agent
        assert self._pool is not None
        return self._pool

    # -- RemoteCollate (pipeline/transport.py) ------------------------------------------------
    def worker_spec(self) -> tuple[type, dict[str, Any], dict[str, Any]]:
        """How ``actors.py`` starts a collate actor: class, arguments, ``.options``."""
        kwargs = {"backends": self.backends, "notif_timeout": self.xfer_timeout}
        return CollateWorker, kwargs, dict(self.actor_options)

    def forget(self, agent_names: list[str]) -> None:
        """Disconnect from remote agents (their actors are gone or going)."""
        with self._lock:
            for name in agent_names:
                if self._loaded.pop(name, None) is not None and self._agent is not None:
                    try:
                        self._agent.remove_remote_agent(name)
                    except Exception:  # noqa: BLE001 - already disconnected is fine
                        logger.debug("torch_raydata: remove_remote_agent(%s) failed", name)

    def _load(self, desc: RemoteBatch) -> None:
        if self._loaded.get(desc.agent, -1) < desc.md_version:
            self.agent.add_remote_agent(desc.metadata)
            self._loaded[desc.agent] = desc.md_version

    # -- Transport -------------------------------------------------------------------------
    def fetch_multiple(self, batches: list[Any]) -> FetchRequest:
        """Post one READ per descriptor, all of them, and return without waiting."""
        self.check_descriptors(batches)
        xfers: list[_Xfer] = []
        request = FetchRequest(batches=batches, handle=xfers)
        with self._lock:
            agent = self.agent
            pool = self.pool
            stream = self.copy_stream
            try:
                for desc in batches:
                    x = _Xfer(desc)
                    xfers.append(x)
                    if desc.nbytes == 0:  # no tensors: nothing to READ, no buffer held remotely
                        x.done = True
                        continue
                    self._load(desc)
                    x.raw = pool.acquire(desc.nbytes, stream)
                    local = agent.get_xfer_descs(
                        [(pool.addr(x.raw), desc.nbytes, pool.dev_id)], pool.mem
                    )
                    remote = agent.get_xfer_descs([(desc.addr, desc.nbytes, 0)], "DRAM")
                    # No notification on the READ itself: its completion would then wait for
                    # the actor to progress; releases are sent once the READs are done.
                    x.handle = agent.initialize_xfer("READ", local, remote, desc.agent, b"")
                    x.posted_at = time.monotonic()
                    state = agent.transfer(x.handle)
                    self.reads_posted += 1
                    self.bytes_read += desc.nbytes
                    if state == "ERR":
                        raise NixlTransferError(f"posting the READ of batch {desc.idx} failed")
            except BaseException as e:
                self.abort(request)
                if isinstance(e, NixlTransferError):
                    raise
                raise NixlTransferError(
                    f"could not READ batch {xfers[-1].desc.idx} from collate actor "
                    f"{xfers[-1].desc.agent} ({type(e).__name__}: {e}); the actor may have died"
                ) from e
        return request

    def wait_fetch_complete(self, request: FetchRequest, timeout: float | None = None) -> list[Any]:
        """Wait for every READ of ``request``; return the payloads in order.

        Raises ``TimeoutError`` when ``timeout`` passes first (the request stays valid and
        can be waited on again), :class:`NixlTransferError` (after aborting the request) on
        an error or when a READ has taken more than ``xfer_timeout``.
        """
        xfers: list[_Xfer] = request.handle
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = _SPIN
        while True:
            with self._lock:
                pending = self._poll(request, xfers)
            if not pending:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(
                    f"READs of batches {[x.desc.idx for x in pending]} still running"
                )
            time.sleep(sleep)
            sleep = min(sleep * 2, _MAX_SPIN)
        with self._lock:
            self._release_sources(xfers)
            return [self._payload(x) for x in xfers]

    def _release_sources(self, xfers: list[_Xfer]) -> None:
        """Tell each actor which of its slabs were READ (one notification per actor)."""
        slabs: dict[str, list[int]] = {}
        for x in xfers:
            if x.release:
                slabs.setdefault(x.desc.agent, []).append(x.desc.slab)
                x.release = False
        for agent_name, ids in slabs.items():
            try:
                self.agent.send_notif(agent_name, release_message(ids))
            except Exception:  # noqa: BLE001 - the actor is gone: nothing to release
                logger.debug("torch_raydata: release notification to %s failed", agent_name)

    def _poll(self, request: FetchRequest, xfers: list[_Xfer]) -> list[_Xfer]:
        agent = self.agent
        pending = []
        for x in xfers:
            if x.done:
                continue
            err: Exception | None = None
            try:
                state = agent.check_xfer_state(x.handle)
            except Exception as e:  # noqa: BLE001 - a disconnected peer raises here
                state, err = "ERR", e
            if state == "DONE":
                x.handle.release()
                x.handle = None
                x.done = x.release = True
                self.reads_done += 1
                continue
            if state == "ERR" or time.monotonic() - x.posted_at > self.xfer_timeout:
                why = (
                    f"failed ({type(err).__name__}: {err})"
                    if err is not None
                    else "failed (NIXL state ERR)"
                    if state == "ERR"
                    else f"did not complete within xfer_timeout={self.xfer_timeout:.0f}s"
                )
                self.abort(request)
                raise NixlTransferError(
                    f"the READ of batch {x.desc.idx} from collate actor {x.desc.agent} {why}; "
                    "the actor may have died"
                ) from err
            pending.append(x)
        return pending

    def _payload(self, x: _Xfer) -> Any:
        desc = x.desc
        device = self._device
        tensors: list[torch.Tensor] = []
        if x.raw is None:
            base = None
        elif self.copy:
            base = x.raw
        else:
            base = self.pool.handout(x.raw)
        for spec in desc.tensors:
            if spec.nbytes == 0 or base is None:
                empty = device.empty if device is not None else torch.empty
                tensors.append(empty(spec.shape, dtype=spec.dtype))
                continue
            flat = base[spec.offset : spec.offset + spec.nbytes]
            t = (torch.from_numpy(flat) if isinstance(flat, np.ndarray) else flat).view(spec.dtype)
            t = t.view(spec.shape)
            if device is not None:
                t = device.clone(t)  # queued on its stream: the buffer is read later
            elif self.copy:
                t = t.clone()
            tensors.append(t)
        payload = unflatten_payload(desc.skeleton, tensors)
        raw, x.raw = x.raw, None
        if device is not None:  # VRAM: the buffer is reused once the clones have read it
            device.finish(
                payload, None if raw is None else functools.partial(self.pool.release, raw)
            )
        elif raw is not None and self.copy:
            self.pool.release(raw)
        return payload

    def on_consume(self, data: Any) -> Any:
        """On the training step's thread: on a CUDA device, its current stream waits for
        the batch's device clones (``device.py``)."""
        if self._device is None:
            return data
        return self._device.on_consume(data)

    def abort(self, request: FetchRequest) -> None:
        """Release every transfer of ``request`` that has not completed (NIXL cancels it);
        a buffer whose transfer cannot be cancelled is never reused."""
        with self._lock:
            for x in request.handle or ():
                if x.handle is not None:
                    try:
                        x.handle.release()
                        x.release = True
                    except Exception:  # noqa: BLE001 - cannot cancel: keep its buffer out
                        logger.warning(
                            "torch_raydata: could not cancel the NIXL READ of batch %d",
                            x.desc.idx,
                            exc_info=True,
                        )
                        self._stuck.append(x.raw)
                        x.raw = None
                    x.handle = None
                if x.raw is not None and self._pool is not None:
                    self._pool.release(x.raw)
                    x.raw = None
                x.done = True
            self._release_sources(request.handle or [])

    def close(self) -> None:
        """Kill every collate actor, disconnect from their agents, deregister the buffers
        (a later epoch starts afresh)."""
        self.forget(self._actors.close())
        with self._lock:
            if self._agent is None:
                return
            try:
                self.forget(list(self._loaded))
                assert self._pool is not None
                self._pool.close()  # waits for the device clones reading its buffers
            finally:
                self._pool = None
                self._stuck.clear()
                self._agent = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _agent=None, _pool=None, _loaded={}, _stuck=[], _actors=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._actors = CollateActors(self)  # a copy starts its own

    def __repr__(self) -> str:
        return (
            f"NixlTransport(device={self.device}, num_actors={self.num_actors}, "
            f"in_flight={self.in_flight}, copy={self.copy})"
        )
