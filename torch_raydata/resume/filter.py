"""The cluster-side filter: consumed rows are dropped on the cluster, so they never
reach the trainer.

Upstream Ray #60294's design (the set in the object store once, a ``map_batches`` stage
appended to the dataset drops consumed rows), with a roaring bitmap cut into key-range
chunks instead of one sorted ID array:

* ``SharedConsumedSet.put`` splits the set into chunks of at most ``CHUNK_BYTES``
  (serialized) and puts their bytes, back to back, into the object store as ONE object:
  one copy per node, read zero-copy by every worker on it. The index (each chunk's key
  range and offset, a few bytes per chunk) travels inside the UDF.
* Per block, only the chunks the block's own key range overlaps are read: a block of
  consecutive IDs (what an epoch without a global shuffle leaves) touches one or two
  chunks whatever the set's size. Deserialized chunks stay in a per-process cache
  bounded by ``WORKER_CACHE_BYTES`` (least recently used out first), so a Ray worker
  holds at most that much of the set besides the shared, zero-copy object.
* In a chunk, the block's keys are looked up by intersection (``kernels.ids.bitmap_mask``).

Measured (benchmarks/RESULTS_resume.md, one Ray worker, 100M consumed IDs = 25 MB):
blocks of consecutive IDs cost 54 ns per row (47 at 10M); with an 8 MiB cache the
worker's private memory grew by 15 MiB instead of the whole set's 25. A block whose IDs
span the whole range (after ``random_shuffle`` upstream) reads every chunk: 454 ns per
row while the set fits the cache, 1,126 with the 8 MiB cache (a deserialization per
chunk per block; see docs/scale.md for 1B IDs).

Does not own the set (``consumed.py``) nor the per-chunk lookup (``kernels.ids``).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..kernels.ids import bitmap_mask, check_column, drop_consumed
from .consumed import ConsumedSet

__all__ = ["CHUNK_BYTES", "WORKER_CACHE_BYTES", "ConsumedFilter", "SharedConsumedSet"]

#: Serialized bytes per chunk of a shared set (a 2^16-key container may exceed it alone).
CHUNK_BYTES = int(os.environ.get("TORCH_RAYDATA_RESUME_CHUNK_BYTES", 1 << 20))
#: Deserialized chunks one worker process keeps (their serialized bytes, summed).
WORKER_CACHE_BYTES = int(os.environ.get("TORCH_RAYDATA_RESUME_CACHE_BYTES", 32 << 20))


@dataclass(frozen=True)
class SharedConsumedSet:
    """A consumed set in the object store, in key-range chunks: ``put`` once by the
    driver; each worker reads only the chunks its blocks' keys fall in (:meth:`mask`).

    ``starts``/``stops`` bound each chunk's key range ``[start, stop)`` (ascending,
    disjoint); chunk ``i``'s bytes are ``offsets[i]:offsets[i + 1]`` of ``ref``'s array.
    """

    ref: Any
    starts: np.ndarray
    stops: np.ndarray
    offsets: np.ndarray
    count: int

    @classmethod
    def put(cls, consumed: ConsumedSet, *, chunk_bytes: int | None = None) -> SharedConsumedSet:
        import ray

        chunks = consumed.chunks(chunk_bytes or CHUNK_BYTES)
        sizes = np.array([len(blob) for _, _, blob in chunks], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        data = np.empty(int(offsets[-1]), dtype=np.uint8)
        for (_, _, blob), a, b in zip(chunks, offsets[:-1], offsets[1:], strict=True):
            data[a:b] = np.frombuffer(blob, dtype=np.uint8)
        starts = np.array([a for a, _, _ in chunks], dtype=np.uint64)
        stops = np.array([b for _, b, _ in chunks], dtype=np.uint64)
        return cls(ray.put(data), starts, stops, offsets, len(consumed))

    @property
    def num_chunks(self) -> int:
        return len(self.starts)

    @property
    def nbytes(self) -> int:
        """Bytes of the object in the object store (per node)."""
        return int(self.offsets[-1])

    def chunk(self, i: int) -> Any:
        """Chunk ``i`` as a BitMap64, from this process's cache or the shared object."""
        key = (self.ref.hex(), i)
        bm = _CACHE.get(key)
        if bm is None:
            from pyroaring import BitMap64

            data = _shared_array(self.ref)
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            bm = BitMap64.deserialize(memoryview(data[a:b]))
            _CACHE.put(key, bm, b - a)
        return bm

    def mask(self, ids: np.ndarray) -> np.ndarray:
        """Which of the uint64 keys ``ids`` are in the set; reads only the chunks whose
        key range the keys' range overlaps."""
        out = np.zeros(len(ids), dtype=bool)
        if len(ids) == 0 or self.num_chunks == 0:
            return out
        ids = np.asarray(ids).astype(np.uint64, copy=False)
        lo, hi = ids.min(), ids.max()
        first = int(np.searchsorted(self.stops, lo, side="right"))
        last = int(np.searchsorted(self.starts, hi, side="right"))
        if last - first == 1:  # the common case: one chunk holds the block's range
            return bitmap_mask(self.chunk(first), ids)
        order = np.argsort(ids, kind="stable")
        keys = ids[order]
        for i in range(first, last):
            a = int(np.searchsorted(keys, self.starts[i], side="left"))
            b = int(np.searchsorted(keys, self.stops[i], side="left"))
            if b > a:
                out[order[a:b]] = bitmap_mask(self.chunk(i), keys[a:b])
        return out


class _ChunkCache:
    """Deserialized chunks of this process, least recently used out first, at most
    ``WORKER_CACHE_BYTES`` (the chunks' serialized bytes: their in-memory size)."""

    def __init__(self) -> None:
        self._items: collections.OrderedDict[tuple[str, int], tuple[Any, int]] = (
            collections.OrderedDict()
        )
        self.nbytes = 0
        self.peak_bytes = 0
        self.loads = 0  # chunks deserialized (a measure of cache misses)

    def get(self, key: tuple[str, int]) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: tuple[str, int], bm: Any, nbytes: int) -> None:
        self.loads += 1
        while self._items and self.nbytes + nbytes > WORKER_CACHE_BYTES:
            _, (_, n) = self._items.popitem(last=False)
            self.nbytes -= n
        self._items[key] = (bm, nbytes)
        self.nbytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


_CACHE = _ChunkCache()  # per process
_ARRAYS: dict[str, np.ndarray] = {}  # per process: ObjectRef hex -> the zero-copy array


def _shared_array(ref: Any) -> np.ndarray:
    """The shared set's bytes (a read-only view of the object store, one per node)."""
    key = ref.hex()
    data = _ARRAYS.get(key)
    if data is None:
        import ray

        data = ray.get(ref)
        while len(_ARRAYS) >= 2:  # one epoch's set at a time (two at a switch)
            old = next(iter(_ARRAYS))
            _ARRAYS.pop(old)
            _CACHE.clear()
        _ARRAYS[key] = data
    return data


def cache_stats() -> dict[str, int]:
    """This process's chunk cache: bytes held, peak, chunks deserialized."""
    return {"bytes": _CACHE.nbytes, "peak_bytes": _CACHE.peak_bytes, "loads": _CACHE.loads}


@dataclass
class ConsumedFilter:
    """``map_batches`` UDF (batch_format="pyarrow") dropping rows whose ID is consumed."""

    consumed: SharedConsumedSet
    id_column: str

    def __call__(self, table: pa.Table) -> pa.Table:
        check_column(self.id_column, table.column_names)
        return drop_consumed(table, self.consumed, self.id_column)
