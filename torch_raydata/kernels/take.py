"""``take_rows``: Arrow's ``Table.take`` at memory speed for fixed-shape tensor columns.

Arrow takes a row of a fixed_size_list / Ray tensor column by expanding it into one
index per *value*: measured here on a Ray tensor column of uint8 (3, 64, 64) rows, 10k
rows of a 20k-row block took 0.6-1.9 s (35-110 MB/s), and a shuffle over such data ran
at 3-6k rows/s. A row of such a column is one contiguous run of bytes, so a numpy take
over a (rows, bytes per row) view of the leaf buffer gathers it at memcpy speed. Written
by hand because neither pyarrow nor Ray offers a row-wise take for these types; every
other column (primitives, strings, nulls, bools, dictionaries) goes to Arrow's own take,
which is fast for them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pyarrow as pa

from .arrow import RAY_FIXED_TENSORS, Plan, chunk_leaf, ext_name, plan_column, primitive_view

__all__ = ["take_rows", "row_views", "gather_rows", "BlockViews", "span_views"]


@functools.lru_cache(maxsize=256)
def _plan(name: str, typ: pa.DataType, wide_only: bool = True) -> Plan | None:
    """The column's plan when it has a fixed-width leaf (under fixed-shape layers, unless
    ``wide_only`` is False: then plain numbers and timestamps too)."""
    try:
        plan = plan_column(name, typ)
    except ValueError:
        return None
    if plan.kind != "tensor" or plan.dictionary or plan.np_dtype == np.bool_:
        return None
    if wide_only and not plan.layers:
        return None
    return plan


def take_rows(table: pa.Table, indices: np.ndarray) -> pa.Table:
    """``table.take(indices)`` (same schema, same values), one memcpy per wide column."""
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= table.num_rows):
        raise IndexError(f"take_rows: indices out of range for a table of {table.num_rows} rows")
    columns = [
        _take_column(name, col, idx)
        for name, col in zip(table.column_names, table.columns, strict=True)
    ]
    return pa.Table.from_arrays(columns, schema=table.schema)


def row_views(
    name: str, col: pa.ChunkedArray, wide_only: bool = True
) -> tuple[Plan, list[np.ndarray]] | None:
    """(plan, one (rows, values per row) view per chunk) of a fixed-shape column with a
    fixed-width leaf and no nulls (``wide_only=False``: plain number columns too); None
    for any other column (take it with Arrow)."""
    plan = _plan(name, col.type, wide_only)
    if plan is None:
        return None
    width = math.prod(plan.phys)
    views = []
    for chunk in col.chunks:
        leaf, nulls = chunk_leaf(name, chunk, plan)
        if leaf is None or nulls:  # nulls: Arrow's take keeps them right
            return None
        views.append(primitive_view(leaf, plan.np_dtype).reshape(len(chunk), width))
    return plan, views


class BlockViews:
    """One block (an Arrow table) and the zero-copy row views of its columns, each worked
    out once per block by the first collate thread that asks, not once per batch.

    Walking a column down to its leaf buffer takes a dozen pyarrow calls per chunk, and
    many of them release and re-take the GIL: per batch, that was the collate threads'
    largest Python cost after the copy (py-spy --gil on an epoch of 3x64x64 uint8 rows:
    21% of the GIL-held samples in ``DefaultCollate``'s per-batch pyarrow calls). Stage 3 wraps each block in one of
    these and sends ``(block, start, stop)`` spans with its batches; two threads filling
    the same entry at once compute the same value, so no lock is needed.
    """

    __slots__ = ("table", "_views")

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self._views: dict[str, tuple[Plan, list[tuple[int, np.ndarray]]] | None] = {}

    def column(self, name: str) -> tuple[Plan, list[tuple[int, np.ndarray]]] | None:
        """(plan, [(first row, (rows, values per row) view)] per chunk) of a fixed-width
        column without nulls; None when the column needs Arrow (see ``row_views``)."""
        try:
            return self._views[name]
        except KeyError:
            pass
        found = row_views(name, self.table.column(name), wide_only=False)
        entry = None
        if found is not None:
            plan, views = found
            starts = np.cumsum([0] + [len(v) for v in views[:-1]]).tolist()
            entry = (plan, list(zip(starts, views, strict=True)))
        self._views[name] = entry
        return entry


def span_views(
    name: str, spans: tuple[tuple[BlockViews, int, int], ...]
) -> tuple[Plan, list[np.ndarray]] | None:
    """``row_views`` of column ``name`` of the table made of rows ``[start, stop)`` of each
    span's block, in order, from the blocks' cached views; None when a block's column
    needs Arrow or the column's type differs between blocks."""
    plan = None
    views = []
    for block, start, stop in spans:
        found = block.column(name)
        if found is None or (plan is not None and found[0] is not plan and found[0] != plan):
            return None
        plan = found[0]
        for first, view in found[1]:
            a, b = max(start, first), min(stop, first + len(view))
            if a < b:
                views.append(view[a - first : b - first])
    return (plan, views) if plan is not None else None


def gather_rows(views: list[np.ndarray], idx: np.ndarray, out: np.ndarray) -> None:
    """``out[k] = row idx[k]`` of the chunks' concatenation, one copy per row."""
    if len(views) == 1:
        # Fancy indexing, not np.take(out=...): 0.3 ms vs 0.8-1.5 ms for 256 rows of 12 KB
        # here (the temporary is recycled by malloc; a second pass over it is cheap).
        out[...] = views[0][idx]
        return
    lengths = np.array([len(v) for v in views], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    which = np.searchsorted(starts, idx, side="right") - 1
    if len(which) < 2 or bool((which[1:] >= which[:-1]).all()):
        # Sorted by chunk (a shuffle's draw is in buffer order): each chunk's rows land
        # in one contiguous run of ``out``; boolean-mask assignment was 37% of a
        # shuffled epoch's samples (py-spy), a slice assignment is a memcpy.
        edges = np.searchsorted(which, np.arange(len(views) + 1), side="left")
        for c in range(len(views)):
            a, b = int(edges[c]), int(edges[c + 1])
            if a < b:
                out[a:b] = views[c][idx[a:b] - starts[c]]
        return
    for c in np.unique(which):
        sel = which == c
        out[sel] = views[c][idx[sel] - starts[c]]


def _take_column(name: str, col: pa.ChunkedArray, idx: np.ndarray) -> pa.ChunkedArray:
    found = row_views(name, col)
    if found is None:
        return col.take(pa.array(idx))
    plan, views = found
    if len(views) == 1:
        out = views[0][idx]
    else:
        out = np.empty((len(idx), math.prod(plan.phys)), dtype=plan.np_dtype)
        gather_rows(views, idx, out)
    return pa.chunked_array([_rebuild(col.type, out.reshape(-1), len(idx))], type=col.type)


def _rebuild(typ: pa.DataType, values: np.ndarray, n: int) -> pa.Array:
    """An array of ``typ`` with ``n`` rows over the flat leaf ``values`` (no nulls)."""
    ext = ext_name(typ)
    if ext in RAY_FIXED_TENSORS:  # list / large_list storage, a fixed count per row
        storage_type = typ.storage_type
        size = math.prod(int(d) for d in typ.shape)
        child = _rebuild(storage_type.value_type, values, n * size)
        large = pa.types.is_large_list(storage_type)
        offsets = pa.array(np.arange(0, (n + 1) * size, size, dtype=np.int64 if large else np.int32))
        cls = pa.LargeListArray if large else pa.ListArray
        storage = cls.from_arrays(offsets, child, type=storage_type)
        return pa.ExtensionArray.from_storage(typ, storage)
    if ext is not None:  # arrow.fixed_shape_tensor: fixed_size_list storage
        return pa.ExtensionArray.from_storage(typ, _rebuild(typ.storage_type, values, n))
    if pa.types.is_fixed_size_list(typ):
        child = _rebuild(typ.value_type, values, n * typ.list_size)
        return pa.FixedSizeListArray.from_arrays(child, type=typ)
    return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(values)])
