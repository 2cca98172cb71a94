"""The cluster-side filter: consumed rows are dropped on the cluster, so they never
reach the trainer.

Upstream Ray #60294's design, with a roaring bitmap instead of the sorted ID array: the
set is put into the object store ONCE, serialized (one copy per node, read zero-copy,
deserialized once per worker process); a ``map_batches`` stage appended to the dataset
drops consumed rows. Per block, only the block's own IDs are looked up: the bitmap's
intersection with them (at most the block's rows) is the sorted array that
``np.searchsorted`` tests against. Measured (benchmarks/bench_resume.py): a sorted array
of 10M IDs is 76 MiB per node and costs ~30 ms to build every resumed epoch; the bitmap
is 0.01-2.5 MB and the per-block lookup ~40 ns per row. It is also how this scales to
1B IDs: 8 GB as an array per node, at most a few hundred MB as a bitmap (and ~0 for the
contiguous ranges an epoch without a global shuffle leaves).

Does not own the set (``consumed.py``) nor the per-block lookup (``kernels.ids``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..kernels.ids import check_column, drop_consumed
from .consumed import ConsumedSet

__all__ = ["ConsumedFilter", "SharedConsumedSet"]


@dataclass(frozen=True)
class SharedConsumedSet:
    """A consumed set in the object store: ``put`` once by the driver, read zero-copy and
    deserialized once per worker process (:meth:`get`), whichever task needs it."""

    ref: Any

    @classmethod
    def put(cls, consumed: ConsumedSet) -> SharedConsumedSet:
        import ray

        return cls(ray.put(consumed.serialized()))

    def get(self) -> Any:
        key = self.ref.hex()
        bm = _WORKER_SETS.get(key)
        if bm is None:
            import ray
            from pyroaring import BitMap64

            bm = BitMap64.deserialize(ray.get(self.ref).tobytes())
            while len(_WORKER_SETS) >= 2:  # one epoch's set at a time (two at a switch)
                _WORKER_SETS.pop(next(iter(_WORKER_SETS)))
            _WORKER_SETS[key] = bm
        return bm

    def bitmap(self) -> Any:
        """The deserialized set (as ``ConsumedSet.bitmap``; see ``kernels.ids.consumed_mask``)."""
        return self.get()


_WORKER_SETS: dict[str, Any] = {}  # per process: ObjectRef hex -> deserialized bitmap


@dataclass
class ConsumedFilter:
    """``map_batches`` UDF (batch_format="pyarrow") dropping rows whose ID is consumed."""

    consumed: SharedConsumedSet
    id_column: str

    def __call__(self, table: pa.Table) -> pa.Table:
        check_column(self.id_column, table.column_names)
        return drop_consumed(table, self.consumed.get(), self.id_column)
