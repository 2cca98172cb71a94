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

The filter (upstream Ray #60294's design, with a roaring bitmap instead of the sorted
ID array): the set is put into the object store ONCE, serialized (one copy per node,
read zero-copy, deserialized once per worker process); a ``map_batches`` stage appended
to the dataset drops consumed rows. Per block, only the block's own IDs are looked up:
the bitmap's intersection with them (at most the block's rows) is the sorted array that
``np.searchsorted`` tests against. Measured (benchmarks/bench_resume.py): a sorted array
of 10M IDs is 76 MiB per node and costs ~30 ms to build every resumed epoch; the bitmap
is 0.01-2.5 MB and the per-block lookup ~40 ns per row. It is also how this scales to
1B IDs: 8 GB as an array per node, at most a few hundred MB as a bitmap (and ~0 for the
contiguous ranges an epoch without a global shuffle leaves).
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
    "ConsumedSet", "ConsumedFilter", "SharedConsumedSet", "consumed_mask", "drop_consumed",
    "split_consumed",
    "ids_as_uint64", "hash_strings", "merge_states",
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

    def serialized(self) -> np.ndarray:
        """The roaring bitmap's portable serialization, as a uint8 array (for ray.put)."""
        bm = self.bitmap()
        bm.run_optimize()
        return np.frombuffer(bm.serialize(), dtype=np.uint8)

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


_WORKER_SETS: dict[str, Any] = {}  # per process: ObjectRef hex -> deserialized bitmap


@dataclass
class ConsumedFilter:
    """``map_batches`` UDF (batch_format="pyarrow") dropping rows whose ID is consumed."""

    consumed: SharedConsumedSet
    id_column: str

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.id_column not in table.column_names:
            raise ValueError(
                f"id_column={self.id_column!r} is not a column of the dataset; columns are "
                f"{table.column_names}"
            )
        return drop_consumed(table, self.consumed.get(), self.id_column)


def consumed_mask(ids: np.ndarray, consumed: Any) -> np.ndarray:
    """Which of the uint64 keys ``ids`` are in ``consumed``: a sorted uint64 array, a
    ``pyroaring.BitMap64``, a :class:`ConsumedSet` or a :class:`SharedConsumedSet`."""
    if isinstance(consumed, SharedConsumedSet):
        consumed = consumed.get()
    if isinstance(consumed, ConsumedSet):
        consumed = consumed.bitmap()
    none = np.zeros(len(ids), dtype=bool)
    if len(ids) == 0 or len(consumed) == 0:
        return none
    if isinstance(consumed, np.ndarray):
        keys = consumed
    else:
        lo, hi = int(ids.min()), int(ids.max())
        if consumed.range_cardinality(lo, hi + 1) == 0:  # no consumed ID in the block's range
            return none
        from pyroaring import BitMap64

        # Only the block's own IDs are looked up: at most len(ids) keys come back.
        keys = np.frombuffer((consumed & BitMap64(ids.tolist())).to_array(), dtype=np.uint64)
        if len(keys) == 0:
            return none
    pos = np.searchsorted(keys, ids)
    pos[pos == len(keys)] = 0
    return keys[pos] == ids


def drop_consumed(table: pa.Table, consumed: Any, id_column: str) -> pa.Table:
    """``table`` without the rows whose ID key is in ``consumed`` (see consumed_mask)."""
    kept, rows = split_consumed(table, consumed, id_column)
    if rows is None:
        return kept
    from .collate._take import take_rows  # Arrow's filter crawls on tensor columns

    return take_rows(kept, rows)


def split_consumed(
    table: pa.Table, consumed: Any, id_column: str
) -> tuple[pa.Table, np.ndarray | None]:
    """The rows of ``table`` not consumed, without copying: ``(table, None)`` when none
    is, ``(zero-copy slices, None)`` when the kept rows come in long runs (an epoch cut
    short without a global shuffle consumed a prefix of the stream), else ``(table, kept
    row positions)`` for the caller to gather (scattered holes, after a global shuffle)."""
    if table.num_rows == 0:
        return table, None
    mask = consumed_mask(ids_as_uint64(table.column(id_column)), consumed)
    if not mask.any():
        return table, None
    keep = ~mask
    # Runs of kept rows: [starts[i], stops[i]).
    edges = np.flatnonzero(np.diff(keep.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [len(keep)]])
    first = keep[bounds[:-1]]
    starts, stops = bounds[:-1][first], bounds[1:][first]
    if len(starts) <= max(4, len(keep) // _ROWS_PER_SLICE):
        parts = [table.slice(a, b - a) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
        return (pa.concat_tables(parts) if parts else table.slice(0, 0)), None
    return table, np.flatnonzero(keep)


#: split_consumed slices (zero-copy) when there are at most 4 kept runs or they average at
#: least this many rows;
#: scattered holes (after a global shuffle) are gathered with one copy instead.
_ROWS_PER_SLICE = 64


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
