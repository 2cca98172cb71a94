"""Exact mid-epoch resume: the consumed-ID set, its compact form, and the cluster-side filter.

Owns: recording the IDs of rows *yielded to the training step* (never the prefetched or
collated-and-waiting ones), encoding them compactly for a checkpoint, merging the sets
of several ranks, and the filter that drops consumed rows on the cluster so they never
reach the trainer. Does not own when state is taken (``RayIterableDataset.state_dict``)
or how ranks exchange it (``lightning.py`` / ``distributed.py``).

Compact form: a 64-bit roaring bitmap (``pyroaring.BitMap64``), measured on this machine
against a delta-encoded, zlib-compressed sorted array (benchmarks/NOTES.md, "resume"):
10M IDs drawn at random from 20M -> 2.5 MB roaring vs 7.6 MB zlib-delta; serialize 3 ms,
deserialize 1.5 ms, set union built in. Contiguous ranges compress to almost nothing.
Sets larger than ``max_inline_bytes`` are written to a file under ``spill_dir`` and the
state keeps the path.

IDs: an integer ``id_column`` is used as is (int64 viewed as uint64; sets don't need
order). A string column is hashed to 64 bits with pandas' vectorised SipHash
(``pandas.util.hash_array``, fixed key, stable across processes and machines); the chance
of any collision among n IDs is about n^2 / 2^65 (1e-6 for 6M IDs, 2.7e-6 for 10M). A
collision makes resume skip one row that was not consumed; use integer IDs to rule it out.

The filter (upstream Ray #60294's design): the sorted ID array is put into the object
store ONCE; a ``map_batches`` stage appended to the dataset gets it zero-copy on each
node (one copy per node) and drops consumed rows with ``np.searchsorted``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "ConsumedSet", "ConsumedFilter", "drop_consumed", "ids_as_uint64", "hash_strings", "merge_states",
]


def hash_strings(values: Any) -> np.ndarray:
    """64-bit stable hashes of strings/bytes (vectorised, no per-row Python)."""
    import pandas as pd

    arr = np.asarray(values, dtype=object)
    return pd.util.hash_array(arr, categorize=False).astype(np.uint64, copy=False)


def ids_as_uint64(ids: Any) -> np.ndarray:
    """An ID column's values (numpy array, Arrow array or list) as uint64 set keys."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        typ = ids.type
        if pa.types.is_integer(typ):
            ids = ids.to_numpy()
        elif pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ):
            return hash_strings(ids.to_pylist())
        else:
            raise ValueError(
                f"id_column has Arrow type {typ}; it must be an integer or string column"
            )
    arr = np.asarray(ids)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False).view(np.uint64)
    if arr.dtype.kind in "OUS":
        return hash_strings(arr)
    raise ValueError(f"id_column values have dtype {arr.dtype}; use an integer or string column")


class ConsumedSet:
    """A set of row IDs (as uint64 keys). Appends are O(1) on the consumer thread; the
    bitmap is built lazily when the state is taken."""

    def __init__(self, bitmap: Any = None) -> None:
        from pyroaring import BitMap64

        self._bitmap = bitmap if bitmap is not None else BitMap64()
        self._pending: list[np.ndarray] = []
        self.added = 0  # keys passed to add(), repeats included (len(self) < added: repeats)

    def add(self, keys: np.ndarray) -> None:
        self._pending.append(keys)
        self.added += len(keys)

    def _flush(self) -> None:
        if self._pending:
            keys = np.concatenate(self._pending)
            self._pending.clear()
            self._bitmap.update(keys.tolist())

    def bitmap(self) -> Any:
        self._flush()
        return self._bitmap

    def __len__(self) -> int:
        return len(self.bitmap())

    def union(self, other: ConsumedSet) -> ConsumedSet:
        return ConsumedSet(self.bitmap() | other.bitmap())

    def sorted_keys(self) -> np.ndarray:
        return np.frombuffer(self.bitmap().to_array(), dtype=np.uint64)

    def __contains__(self, key: int) -> bool:
        return key in self.bitmap()

    # -- encoding --------------------------------------------------------------------------
    def encode(self, *, spill_dir: str | None = None, max_inline_bytes: int = 64 << 20) -> dict:
        bm = self.bitmap()
        bm.run_optimize()
        blob = bm.serialize()
        if len(blob) > max_inline_bytes:
            if spill_dir is None:
                raise ValueError(
                    f"the consumed-ID set is {len(blob):,} bytes (> {max_inline_bytes=}); set "
                    "RayIterableDataset.spill_dir to a checkpoint directory to spill it to a file"
                )
            os.makedirs(spill_dir, exist_ok=True)
            path = os.path.join(spill_dir, f"trd-consumed-{uuid.uuid4().hex}.roaring")
            with open(path, "wb") as f:
                f.write(blob)
            return {"format": "roaring64", "path": path, "count": len(bm)}
        return {"format": "roaring64", "bytes": blob, "count": len(bm)}

    @classmethod
    def decode(cls, enc: Any) -> ConsumedSet:
        from pyroaring import BitMap64

        if not isinstance(enc, dict) or enc.get("format") != "roaring64":
            raise ValueError(f"consumed-ID set must be a roaring64 encoding, got {enc!r:.120}")
        if "bytes" in enc:
            blob = enc["bytes"]
        elif "path" in enc:
            try:
                with open(enc["path"], "rb") as f:
                    blob = f.read()
            except OSError as e:
                raise ValueError(
                    f"the consumed-ID set was spilled to {enc['path']!r}, which cannot be read "
                    f"({e}); restore the checkpoint directory with it"
                ) from e
        else:
            raise ValueError(f"consumed-ID set has neither bytes nor path: {enc!r:.120}")
        try:
            bm = BitMap64.deserialize(blob)
        except Exception as e:  # pyroaring raises IndexError/ValueError on garbage
            raise ValueError(
                f"consumed-ID set is corrupt: {len(blob)} bytes that are not a roaring64 "
                f"bitmap ({type(e).__name__}: {e}); restore the checkpoint's loader state"
            ) from e
        if "count" in enc and len(bm) != enc["count"]:
            raise ValueError(f"consumed-ID set is corrupt: {len(bm)} IDs, expected {enc['count']}")
        return cls(bm)


@dataclass
class ConsumedFilter:
    """``map_batches`` UDF (batch_format="pyarrow") dropping rows whose ID is consumed.

    Holds an ObjectRef to the sorted uint64 keys, resolved zero-copy in the worker.
    """

    keys_ref: Any
    id_column: str

    def __call__(self, table: pa.Table) -> pa.Table:
        import ray

        keys = ray.get(self.keys_ref)  # zero-copy from this node's object store
        if self.id_column not in table.column_names:
            raise ValueError(
                f"id_column={self.id_column!r} is not a column of the dataset; columns are "
                f"{table.column_names}"
            )
        return drop_consumed(table, keys, self.id_column)


def drop_consumed(table: pa.Table, keys: np.ndarray, id_column: str) -> pa.Table:
    """``table`` without the rows whose ID key is in the sorted array ``keys``."""
    if len(keys) == 0 or table.num_rows == 0:
        return table
    ids = ids_as_uint64(table.column(id_column))
    pos = np.searchsorted(keys, ids)
    pos[pos == len(keys)] = 0
    consumed = keys[pos] == ids
    if not consumed.any():
        return table
    return table.filter(pa.array(~consumed))


def merge_states(states: Sequence[dict], *, spill_dir: str | None = None) -> dict:
    """One loader state from every rank's ``RayIterableDataset.state_dict()``.

    The consumed-ID sets are united, so the merged state resumes on any number of ranks:
    the remaining rows are split afresh among them. All states must be of the same epoch
    and configuration (they are, when every rank saves at the same training step).

    Raises:
        ValueError: the ranks are at different epochs or configurations, or an ID was
            consumed on two ranks (the ``id_column`` is not unique across the dataset).
    """
    if not states:
        raise ValueError("merge_states() needs at least one state")
    first = states[0]
    for key in ("version", "epoch", "exact", "fingerprint"):
        seen = [s.get(key) for s in states]
        if any(v != seen[0] for v in seen):
            raise ValueError(
                f"the ranks' loader states differ in {key}: {seen!r:.300}. Every rank must run "
                "every epoch and take its state at the same training step"
            )
    merged = dict(first)
    merged["world_size"] = len(states)
    # Equal steps: every rank has consumed as many batches (the min is the safe side of
    # the best-effort skip-ahead if they ever differ); rows add up.
    merged["batches_consumed"] = min(int(s["batches_consumed"]) for s in states)
    merged["rows_consumed"] = sum(int(s.get("rows_consumed", 0)) for s in states)
    if first.get("exact"):
        sets = [ConsumedSet.decode(s["consumed"]) for s in states]
        union = ConsumedSet()
        for one in sets:
            union = union.union(one)
        total = sum(len(one) for one in sets)
        if len(union) != total:
            raise ValueError(
                f"{total - len(union)} IDs were consumed on more than one rank: the "
                f"id_column {first['fingerprint'].get('id_column')!r} is not unique across "
                "the dataset, and a resume by ID would skip rows never trained on"
            )
        merged["consumed"] = union.encode(spill_dir=spill_dir)
    return merged
