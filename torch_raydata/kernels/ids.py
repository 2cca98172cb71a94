"""Row-ID keys: an ``id_column``'s values as uint64 set keys, and the rows of a table
whose key is (not) in a consumed set.

Owns the key rules and the per-block lookup. Does not own the consumed set itself, its
encoding or the cluster-side filter (``torch_raydata.resume``).

IDs: an integer ``id_column`` is used as is (int64 viewed as uint64; sets don't need
order). A string column is hashed to 64 bits with pandas' vectorised SipHash
(``pandas.util.hash_array``, fixed key, stable across processes and machines); the chance
of any collision among n IDs is about n^2 / 2^65 (1e-6 for 6M IDs, 2.7e-6 for 10M). A
collision makes resume skip one row that was not consumed; use integer IDs to rule it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .take import take_rows

__all__ = [
    "bitmap_mask",
    "check_column",
    "column_ids",
    "consumed_mask",
    "drop_consumed",
    "hash_strings",
    "ids_as_uint64",
    "split_consumed",
]


def check_column(name: str, columns: Sequence[str], option: str = "id_column") -> None:
    """Raise the one error for an option naming a column the dataset does not have."""
    if name not in columns:
        raise ValueError(
            f"{option}={name!r} is not a column of the dataset; columns are {list(columns)}"
        )


def hash_strings(values: Any) -> np.ndarray:
    """64-bit stable hashes of strings/bytes (vectorised, no per-row Python)."""
    import pandas as pd  # deferred: seconds to import, needed for string IDs only

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


def column_ids(table: pa.Table, id_column: str) -> np.ndarray:
    """The table's row IDs as uint64 set keys; the column must exist and have no nulls."""
    check_column(id_column, table.column_names)
    col = table.column(id_column)
    if col.null_count:
        raise ValueError(
            f"id_column {id_column!r} has {col.null_count} null values; every row needs a "
            "unique id (fill or drop nulls in a map_batches step)"
        )
    return ids_as_uint64(col)


def consumed_mask(ids: np.ndarray, consumed: Any) -> np.ndarray:
    """Which of the uint64 keys ``ids`` are in ``consumed``: a sorted uint64 array, a
    ``pyroaring.BitMap64``, anything with a ``mask(ids)`` method (``resume.
    SharedConsumedSet``: looks up only the chunks the keys' range touches) or with a
    ``bitmap()`` method returning a BitMap64 (``resume.ConsumedSet``)."""
    if hasattr(consumed, "mask"):
        return consumed.mask(ids)
    if hasattr(consumed, "bitmap"):
        consumed = consumed.bitmap()
    if isinstance(consumed, np.ndarray):
        none = np.zeros(len(ids), dtype=bool)
        if len(ids) == 0 or len(consumed) == 0:
            return none
        return _isin_sorted(ids, consumed)
    return bitmap_mask(consumed, ids)


def bitmap_mask(bitmap: Any, ids: np.ndarray) -> np.ndarray:
    """Which of the uint64 keys ``ids`` are in the ``BitMap64``: only the keys' own
    entries are looked up (the intersection with them, at most ``len(ids)`` keys, is the
    sorted array the keys are tested against), never the whole set."""
    none = np.zeros(len(ids), dtype=bool)
    if len(ids) == 0 or len(bitmap) == 0:
        return none
    ids = np.asarray(ids).astype(np.uint64, copy=False)
    lo, hi = int(ids.min()), int(ids.max())
    if bitmap.range_cardinality(lo, hi + 1) == 0:  # no consumed ID in the keys' range
        return none
    import array

    from pyroaring import BitMap64  # deferred: resume is the only user

    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    mine = BitMap64(array.array("Q", ordered.tobytes()))
    keys = np.frombuffer((bitmap & mine).to_array(), dtype=np.uint64)
    if len(keys) == 0:
        return none
    # Sorted needles: the lookups walk ``keys`` in order (random ones are ~50x slower
    # for millions of keys).
    none[order] = _isin_sorted(ordered, keys)
    return none


def _isin_sorted(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(keys, ids)
    pos[pos == len(keys)] = 0
    return keys[pos] == ids


#: split_consumed slices (zero-copy) when there are at most 4 kept runs or they average at
#: least this many rows; scattered holes (after a global shuffle) are gathered with one
#: copy instead.
_ROWS_PER_SLICE = 64


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


def drop_consumed(table: pa.Table, consumed: Any, id_column: str) -> pa.Table:
    """``table`` without the rows whose ID key is in ``consumed`` (see consumed_mask)."""
    kept, rows = split_consumed(table, consumed, id_column)
    if rows is None:
        return kept
    return take_rows(kept, rows)  # Arrow's filter crawls on tensor columns
