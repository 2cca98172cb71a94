"""Probe (not product): stage 4 in same-node Ray actors that collate into shared memory.

    python -m benchmarks.shm_probe                  # W1 data: step tax + rows/s (~2 min)
    python -m benchmarks.shm_probe --reps 2 --competitors shm_probe,trd

Issue 13 names one lever the thread pool cannot reach: a background thread's Python
costs the training step two to three times its own time (docs/performance.md section 4),
so (b) step inflation stays above +10% while stages 3-4 run in the trainer. This module
measures the other design, on a MaterializedDataset, with the same harness
(``benchmarks.step_tax``) and the same competitors in one run:

* ``workers`` Ray actors pinned to this node (``num_cpus=0``, like DataLoader workers
  Ray does not count) each map one shared-memory ring made once per loader (``/dev/shm``,
  unlinked once mapped) and run the product's ``DefaultCollate.collate_spans`` with an
  allocator that places columns in a ring slot. Blocks come from the object store with
  ``ray.get`` in the actor: zero copy on the node, so a batch costs one copy in all.
* The trainer gets ``(slot, column offsets)`` over a Unix socket per actor and wraps
  the slot with ``torch.from_numpy`` (no copy); the batch owns the slot until its last
  tensor dies, when the slot's lease sends it back (the ``memory.buffers.Lease`` idea
  across processes). No trainer thread: ``next()`` is a socket read and a few views.

Scope, on purpose: a MaterializedDataset (block refs reach the actors as task arguments,
so Ray tracks them), batches in dataset order split round-robin over the actors, no
shuffle, resume or transport. A step that holds every slot of an actor gets a clear
error instead of a deadlock. Why not a Ray actor call per batch: each call's submit
and ``ray.get`` run Python on the trainer's thread, the very cost this probe removes
(not measured here).
"""

from __future__ import annotations

import argparse
import gc
import math
import mmap
import os
import pickle
import socket
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch

from torch_raydata.memory.buffers import Lease

__all__ = ["ShmCollateLoader", "main"]

_ALIGN = 64
_FAILED = 0xFFFFFFFF  # frame sent by an actor whose serve() raised: ray.get the call
_CONNECT_TIMEOUT_S = 120.0  # actors' start (a hang guard, not a speed limit)


def _frame(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("collate actor closed its socket")
        got += k
    return bytes(buf)


class _SlotAllocator:
    """``empty_numpy`` for ``DefaultCollate``: bump allocation inside one ring slot.
    A column that does not fit falls back to private memory and travels pickled."""

    def __init__(self, slot: np.ndarray, offset: int) -> None:
        self.slot, self.offset, self.pos = slot, offset, 0
        self.placed: dict[int, tuple[int, tuple[int, ...], str]] = {}

    def empty_numpy(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        start = -(-self.pos // _ALIGN) * _ALIGN
        if start + nbytes > len(self.slot):
            return np.empty(shape, dtype)
        self.pos = start + nbytes
        out = self.slot[start : start + nbytes].view(dtype).reshape(shape)
        self.placed[out.ctypes.data] = (self.offset + start, tuple(shape), dtype.str)
        return out

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        return torch.from_numpy(self.empty_numpy(shape, np_dtype))


@ray.remote(num_cpus=0)
class _CollateActor:
    def __init__(self, shm_path: str, sock_path: str, token: int) -> None:
        fd = os.open(shm_path, os.O_RDWR)
        try:
            self.ring = np.frombuffer(mmap.mmap(fd, 0), np.uint8)
        finally:
            os.close(fd)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sock_path)
        self.sock.sendall(bytes([token]))
        # Slot state lives as long as the actor, not one epoch: a batch the step still
        # holds from the last epoch keeps its slot, and returns are read as they come
        # (never left to pile up in the socket, where the trainer's send would block).
        self.free: list[int] | None = None
        self.returns = bytearray()

    def _take_returns(self, wait: bool) -> None:
        """Move returned slots from the socket to ``self.free``; ``wait``: until one."""
        assert self.free is not None
        try:
            while True:
                self.sock.setblocking(wait and not self.free)
                try:
                    data = self.sock.recv(4096)
                except BlockingIOError:
                    return
                if not data:
                    raise EOFError("the trainer closed its socket")
                self.returns += data
                whole = len(self.returns) // 4 * 4
                self.free += [
                    int.from_bytes(self.returns[i : i + 4], "big") for i in range(0, whole, 4)
                ]
                del self.returns[:whole]
        finally:
            self.sock.setblocking(True)

    def serve(
        self,
        tasks: list[tuple[int, list[tuple[Any, int, int]]]],
        slots: list[int],
        slot_bytes: int,
        collate: Any,
        fail_at: int | None = None,
    ) -> tuple[int, float]:
        """Collate ``tasks`` (batch index, [(block ref, start, stop)]) into ``slots``;
        returns (batches, CPU seconds). ``fail_at``: raise at that batch (tests)."""
        cpu0 = time.process_time()
        try:
            self._serve(tasks, slots, slot_bytes, collate, fail_at)
        except BaseException:
            self.sock.sendall(_frame(_FAILED))  # else the trainer would wait on recv forever
            raise
        self.sock.sendall(_frame(0))
        return len(tasks), time.process_time() - cpu0

    def _serve(
        self,
        tasks: list[tuple[int, list[tuple[Any, int, int]]]],
        slots: list[int],
        slot_bytes: int,
        collate: Any,
        fail_at: int | None,
    ) -> None:
        import pyarrow as pa

        from torch_raydata.kernels.take import BlockViews

        if self.free is None:
            self.free = list(slots)
        blocks: dict[Any, Any] = {}  # ref -> BlockViews, the last few blocks
        for index, pieces in tasks:
            if index == fail_at:
                raise ValueError(f"probe: injected failure at batch {index}")
            self._take_returns(wait=False)
            if not self.free:
                self._take_returns(wait=True)
            slot = self.free.pop()
            offset = slot * slot_bytes
            alloc = _SlotAllocator(self.ring[offset : offset + slot_bytes], offset)
            collate.allocator = alloc
            spans, tables = [], []
            for ref, start, stop in pieces:
                views = blocks.get(ref)
                if views is None:
                    if len(blocks) > 2:
                        blocks.pop(next(iter(blocks)))
                    views = blocks[ref] = BlockViews(ray.get(ref))
                spans.append((views, start, stop))
                tables.append(views.table.slice(start, stop - start))
            out = collate.collate_spans(pa.concat_tables(tables), tuple(spans))
            desc = {
                name: alloc.placed.get(value.data_ptr(), value)
                if isinstance(value, torch.Tensor)
                else value
                for name, value in out.items()
            }
            msg = pickle.dumps((index, slot, desc), protocol=5)
            self.sock.sendall(_frame(len(msg)) + msg)


class _SlotReturns:
    """The "pool" of ``memory.buffers.Lease`` for one actor's slots: when a batch's last
    view dies, its lease gives the slot back here, and it goes back over the socket."""

    def __init__(self, sock: socket.socket, slot_bytes: int, base: int) -> None:
        self.sock, self.slot_bytes, self.base = sock, slot_bytes, base
        self.held = 0
        self.ref = weakref.ref(self)

    def lease(self, ring: np.ndarray, slot: int) -> np.ndarray:
        """The slot's bytes as a uint8 array whose base is a lease on it."""
        raw = ring[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]  # keeps the ring
        self.held += 1
        return np.asarray(Lease(raw, raw.ctypes.data, self.ref))  # type: ignore[arg-type]

    def _give_back(self, raw: np.ndarray, address: int) -> None:
        self.held -= 1
        try:
            self.sock.sendall(_frame((address - self.base) // self.slot_bytes))
        except OSError:
            pass  # the loader is closed: the slot is never handed out again


class ShmCollateLoader:
    """Batches of a MaterializedDataset collated by ``workers`` same-node actors into a
    shared ring of ``workers * slots_per_worker`` slots of ``slot_bytes``."""

    def __init__(
        self,
        ds: Any,
        batch_size: int = 256,
        *,
        workers: int = 2,
        slots_per_worker: int = 4,
        slot_bytes: int = 4 << 20,
        collate: Any = None,
    ) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from torch_raydata.collate import DefaultCollate
        from torch_raydata.pipeline.source import RaySource

        self.ds, self.batch_size, self.workers = ds, batch_size, workers
        self.slots_per_worker, self.slot_bytes = slots_per_worker, slot_bytes
        self.collate = collate if collate is not None else DefaultCollate()
        self.blocks = list(RaySource(ds).open())  # a MaterializedDataset: the same refs
        self.cpu: list[tuple[int, float]] = []  # (batches, CPU s) per actor, last epoch
        total = workers * slots_per_worker * slot_bytes
        folder = tempfile.mkdtemp(dir="/dev/shm", prefix="trd-probe-")
        shm_path, sock_path = os.path.join(folder, "ring"), os.path.join(folder, "sock")
        fd = os.open(shm_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, total)
            self._ring = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self._ring_array = np.frombuffer(self._ring, np.uint8)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(sock_path)
            server.listen(workers)
            node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)
            self.actors = [
                _CollateActor.options(  # type: ignore[attr-defined]
                    scheduling_strategy=node
                ).remote(shm_path, sock_path, w)
                for w in range(workers)
            ]
            self._socks: list[socket.socket] = [server] * workers
            server.settimeout(_CONNECT_TIMEOUT_S)  # an actor that failed to start: an error
            for _ in range(workers):
                conn, _ = server.accept()
                conn.settimeout(None)
                self._socks[_recv_exact(conn, 1)[0]] = conn
        finally:
            server.close()
            os.unlink(sock_path)
            os.unlink(shm_path)
            os.rmdir(folder)
        base = self._ring_array.ctypes.data
        self._returns = [_SlotReturns(sock, slot_bytes, base) for sock in self._socks]

    def _plan(self) -> list[list[tuple[Any, int, int]]]:
        batches: list[list[tuple[Any, int, int]]] = []
        cur: list[tuple[Any, int, int]] = []
        need = self.batch_size
        for block in self.blocks:
            if block.num_rows is None:
                raise ValueError(f"block {block.ref} has no row count: pass a MaterializedDataset")
            start, stop = block.rows or (0, block.num_rows)
            while start < stop:
                take = min(need, stop - start)
                cur.append((block.ref, start, start + take))
                start, need = start + take, need - take
                if need == 0:
                    batches.append(cur)
                    cur, need = [], self.batch_size
        if cur:
            batches.append(cur)
        return batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.epoch()

    def epoch(self, fail_at: int | None = None) -> Iterator[dict[str, Any]]:
        batches = self._plan()
        k, spw = self.workers, self.slots_per_worker
        calls = [
            actor.serve.remote(
                [(i, b) for i, b in enumerate(batches) if i % k == w],
                list(range(w * spw, (w + 1) * spw)),
                self.slot_bytes,
                self.collate,
                fail_at,
            )
            for w, actor in enumerate(self.actors)
        ]
        done = False
        try:
            for i in range(len(batches)):
                w = i % k
                if self._returns[w].held >= spw:
                    raise RuntimeError(
                        f"the training step holds all {spw} ring slots of collate actor {w}: "
                        "release batches (or .clone() what you keep), or raise slots_per_worker"
                    )
                yield self._receive(w, calls[w])
            for w in range(k):
                _recv_exact(self._socks[w], 4)  # the end-of-epoch frame
            self.cpu = ray.get(calls)
            done = True
        finally:
            if not done:  # a step raised or the epoch was abandoned: the actors are
                self.close()  # mid-epoch and cannot be told where it stopped, so close

    @property
    def _held(self) -> list[int]:
        """Batches alive per actor (each holds one slot)."""
        return [r.held for r in self._returns]

    def _receive(self, w: int, call: Any) -> dict[str, Any]:
        sock = self._socks[w]
        try:
            size = int.from_bytes(_recv_exact(sock, 4), "big")
            if size in (0, _FAILED):
                raise EOFError(f"collate actor {w} ended its epoch early")
            _, slot, desc = pickle.loads(_recv_exact(sock, size))
        except EOFError:
            ray.get(call)  # re-raises the actor's exception
            raise
        lease = self._returns[w].lease(self._ring_array, slot)
        rel = slot * self.slot_bytes
        out: dict[str, Any] = {}
        for name, value in desc.items():
            if isinstance(value, tuple):
                offset, shape, dtype = value
                dt = np.dtype(dtype)
                start = offset - rel
                view = lease[start : start + math.prod(shape) * dt.itemsize]
                out[name] = torch.from_numpy(view.view(dt).reshape(shape))
            else:
                out[name] = value
        return out

    def close(self) -> None:
        """Kill the actors. Batches still alive keep the ring mapped (their leases hold
        this loader); their slots are simply never handed out again."""
        self.blocks = []
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        for sock in self._socks:
            sock.close()


def _proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by processes ``pids`` of this node."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def _actor_pids(comp: Any) -> list[int]:
    """The collate actors' pids of a trd competitor with transport='shm' (else [])."""
    actors = getattr(getattr(getattr(comp, "ds", None), "transport", None), "_actors", None)
    if actors is None:
        return []
    return [ray.get(h.stats.remote())["pid"] for h in list(actors._live.values())]


def main(argv: list[str] | None = None) -> int:
    from . import step_tax
    from .bench import build_workload, init_ray
    from .competitors import LABELS, make_competitor
    from .measure import run_epoch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="rows/s epochs per competitor")
    ap.add_argument("--competitors", default="shm_probe,trd,ray_torch,dl2")
    ap.add_argument("--probe-workers", type=int, default=2, help="collate actors")
    ap.add_argument("--probe-slots", type=int, default=4, help="ring slots per actor")
    args = ap.parse_args(argv)
    init_ray()
    wl = build_workload("fixed", args.rows, args.blocks, {})
    labels = {
        **LABELS,
        "shm_probe": f"probe: collate in {args.probe_workers} same-node actors into shm",
    }
    comps: dict[str, Any] = {}
    for key in args.competitors.split(","):
        if key == "shm_probe":
            comps[key] = ShmCollateLoader(
                wl.dataset, workers=args.probe_workers, slots_per_worker=args.probe_slots
            )
        else:
            comps[key] = make_competitor(key, wl)
    held = {k: torch.from_numpy(v[:256].copy()) for k, v in wl.columns.items()}
    gc.collect()
    gc.freeze()
    rows = step_tax.inflation(comps, held, args.reps)
    rates: dict[str, list[float]] = {k: [] for k in comps}
    cpu: dict[str, list[float]] = {k: [] for k in comps}
    actor_cpu: dict[str, list[float]] = {}
    for _ in range(args.epochs):  # interleaved: drift hits every competitor alike
        for key, comp in comps.items():
            pids = _actor_pids(comp)
            before = _proc_cpu(pids)
            epoch = run_epoch(comp.epoch, wl.id_column)  # make bench's own loop
            rates[key].append(epoch.rows_per_s)
            cpu[key].append(epoch.cpu_seconds / epoch.rows * 1e6)
            if isinstance(comp, ShmCollateLoader):
                actor_cpu.setdefault(key, []).append(
                    sum(c for _, c in comp.cpu) / epoch.rows * 1e6
                )
            elif pids:
                spent = _proc_cpu(pids) - before
                actor_cpu.setdefault(key, []).append(spent / epoch.rows * 1e6)
    print(f"load average {os.getloadavg()}", file=sys.stderr)
    print(step_tax.markdown("Step tax on W1's data, with the shm probe", rows, labels))
    print("\n| loader | rows/s median (min-max) | trainer CPU µs/row |\n|---|---:|---:|")
    for key, v in rates.items():
        print(
            f"| {labels.get(key, key)} | {np.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f}) "
            f"| {np.median(cpu[key]):.2f} |"
        )
    for key, v in actor_cpu.items():
        print(f"\n{key}: the collate actors' CPU {np.median(v):.2f} µs/row (median)")
    for comp in comps.values():
        comp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
