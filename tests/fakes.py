"""Ray-free stand-ins for stage 1 and the object store, used by the stage tests."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pyarrow as pa

from torch_raydata.pipeline.types import SourceBlock


def make_blocks(sizes: list[int], *, start: int = 0, extra: bool = True) -> list[pa.Table]:
    """Arrow blocks with a unique int64 'id' (consecutive from ``start``) and a payload."""
    out = []
    for n in sizes:
        ids = np.arange(start, start + n, dtype=np.int64)
        cols = {"id": ids}
        if extra:
            cols["x"] = ids.astype(np.float32) * 0.5
        out.append(pa.table(cols))
        start += n
    return out


class FakeFetcher:
    """Resolves ``ref`` keys from a dict. ``ready`` decides which keys are ready now
    (default: all). Records every call so tests can assert batching of calls."""

    def __init__(self, store: dict[Any, Any], ready=None) -> None:
        self.store = store
        self.ready = ready  # callable(key) -> bool, or None for always
        self.wait_calls: list[tuple[list[Any], float, int | None]] = []
        self.get_calls: list[list[Any]] = []
        self.lock = threading.Lock()
        self.fail_on_get: Any = None
        # Set by the first wait() after a get(): the prefetch loop that did the get has
        # finished handing blocks on (a detector for "nothing was emitted out of order").
        self.waited_after_get = threading.Event()

    def wait(self, refs, *, timeout, num_returns=None):
        with self.lock:
            self.wait_calls.append((list(refs), timeout, num_returns))
            if self.get_calls:
                self.waited_after_get.set()
        if self.ready is None:
            return list(refs)
        ready = [r for r in refs if self.ready(r)]
        if not ready and timeout > 0 and num_returns:
            ev = getattr(self, "became_ready", None)
            if ev is not None:
                ev.wait(timeout)
            ready = [r for r in refs if self.ready(r)]
        return ready

    def get(self, refs):
        with self.lock:
            self.get_calls.append(list(refs))
        if self.fail_on_get is not None and self.fail_on_get in refs:
            raise ConnectionError(f"object {self.fail_on_get} lost")
        return [self.store[r] for r in refs]


def source_of(tables: list[pa.Table]) -> tuple[list[SourceBlock], FakeFetcher]:
    store = {f"b{i}": t for i, t in enumerate(tables)}
    blocks = [
        SourceBlock(ref=f"b{i}", size_bytes=t.nbytes, num_rows=t.num_rows)
        for i, t in enumerate(tables)
    ]
    return blocks, FakeFetcher(store)


def assert_same_batch(a: dict, b: dict) -> None:
    """Two collated batches are equal: keys, tensor dtypes, shapes and bytes, other values."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
        else:
            assert a[k] == b[k], k


def dead_actors(actors: list, timeout: float = 60.0) -> bool:
    """Every actor is dead (ray.kill is asynchronous: poll until a call fails)."""
    import time

    import ray

    deadline = time.monotonic() + timeout
    for a in actors:
        while True:
            try:
                ray.get(a.ready.remote(), timeout=timeout)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, f"actor {a} still alive"
            time.sleep(0.05)
    return True
