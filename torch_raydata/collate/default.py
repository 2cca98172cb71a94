"""`DefaultCollate`: one Arrow table -> a dict of tensors (and Python lists for text).

This module owns the column-by-column dispatch and the `dtypes` rules; the Arrow
type rules and the single copy live in `torch_raydata.kernels.arrow`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import torch

from torch_raydata.kernels.arrow import (
    Allocator,
    Plan,
    allocate,
    collate_tensor,
    plan_column,
    torch_dtype_of,
)
from torch_raydata.kernels.take import BlockViews, gather_rows, row_views, span_views

__all__ = ["DefaultCollate"]

_ALLOWED_DTYPES = frozenset(
    {
        torch.bool,
        *(torch.uint8, torch.uint16, torch.uint32, torch.uint64),
        *(torch.int8, torch.int16, torch.int32, torch.int64),
        *(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    }
)


def _normalize_dtypes(dtypes: object) -> torch.dtype | dict[str, torch.dtype] | None:
    """Validate the `dtypes` argument at construction time."""

    def check(value: object, where: str) -> torch.dtype:
        if not isinstance(value, torch.dtype) or value not in _ALLOWED_DTYPES:
            raise TypeError(
                f"{where}={value!r} is not a supported torch.dtype: use one of "
                f"{sorted(str(d) for d in _ALLOWED_DTYPES)}"
            )
        return value

    if dtypes is None or isinstance(dtypes, torch.dtype):
        return None if dtypes is None else check(dtypes, "dtypes")
    if not isinstance(dtypes, Mapping):
        raise TypeError(
            f"dtypes={dtypes!r} must be None, a torch.dtype, or a dict column -> torch.dtype"
        )
    for key in dtypes:
        if not isinstance(key, str):
            raise TypeError(f"dtypes key {key!r} must be a column name (str)")
    return {key: check(value, f"dtypes[{key!r}]") for key, value in dtypes.items()}


_NUMPY_DTYPES: dict[torch.dtype, np.dtype | None] = {}


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype of a torch dtype; None when numpy has none (bfloat16)."""
    try:
        return _NUMPY_DTYPES[dtype]
    except KeyError:
        try:
            found: np.dtype | None = torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError:
            found = None
        _NUMPY_DTYPES[dtype] = found
        return found


class DefaultCollate:
    """Collate a `pyarrow.Table` into `{column: tensor or list}`, one copy per column.

    Columns become tensors of shape `(num_rows, *element_shape)`:

    * ints, uints, floats (incl. float16) and bool keep their type;
    * `fixed_size_list` (nested too), Ray's fixed-shape tensor extension types
      (`ArrowTensorType`, `ArrowTensorTypeV2`) and Arrow's native
      `fixed_shape_tensor` become multi-dimensional tensors;
    * timestamps, dates, times and durations become int64 (their physical value);
    * numeric dictionary columns are decoded.

    String and binary columns (also dictionary-encoded ones) become Python lists.
    Nulls in a tensor column, variable-length lists (use `PadCollate`), and types
    with no tensor form (struct, map, union, decimal, null) raise `ValueError`.

    The output owns its memory: each Arrow chunk is viewed zero-copy and copied once
    into the output tensor, so a training step may modify the batch in place without
    touching the (possibly shared) Arrow buffers.

    Args:
        dtypes: None (keep each column's type), a single `torch.dtype` applied to every
            numeric (int/float, incl. tensor) column — bool and temporal columns keep
            theirs — or a dict `{column: torch.dtype}` for any tensor column. The cast
            happens during the one copy. Unknown column names raise `ValueError` at the
            first call (only then is the schema known).
        allocator: keyword-only hook `allocator(shape: tuple, dtype: torch.dtype) ->
            torch.Tensor` used for every output tensor, e.g. to collate straight into
            pinned staging memory. It must return a contiguous CPU tensor of exactly
            that shape and dtype. Default: `torch.empty`.
    """

    def __init__(
        self,
        dtypes: torch.dtype | dict[str, torch.dtype] | None = None,
        *,
        allocator: Allocator | None = None,
    ) -> None:
        if allocator is not None and not callable(allocator):
            raise TypeError(
                f"allocator={allocator!r} must be callable(shape, dtype) -> torch.Tensor"
            )
        self.dtypes = _normalize_dtypes(dtypes)
        self.allocator = allocator
        # Planning a column inspects its Arrow type in Python; batches of one dataset
        # share a schema, so plan once per (column, type) and reuse.
        self._plans: dict[tuple, Plan] = {}

    def __repr__(self) -> str:
        return f"DefaultCollate(dtypes={self.dtypes!r}, allocator={self.allocator!r})"

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor | list]:
        table = self.check_table(table)
        return {
            name: self.collate_column(name, column)
            for name, column in zip(table.schema.names, table.columns, strict=True)
        }

    def gather(
        self,
        table: pa.Table,
        rows: np.ndarray,
        spans: tuple[tuple[BlockViews, int, int], ...] | None = None,
    ) -> dict[str, torch.Tensor | list]:
        """``self(table.take(rows))`` with one copy: fixed-shape columns are gathered
        straight from the Arrow buffers into the batch tensors (a shuffle's draw, or the
        rows a resume keeps). Other columns go through Arrow's take, then collate.
        ``spans``, when given, say which blocks ``table`` is made of (see
        ``collate_spans``): their views are reused instead of worked out per batch."""
        table = self.check_table(table)
        idx = np.asarray(rows, dtype=np.int64)
        out: dict[str, torch.Tensor | list] = {}
        for name, column in zip(table.schema.names, table.columns, strict=True):
            if spans is not None:
                found = span_views(name, spans)
            else:
                found = row_views(name, column, wide_only=False)
            if found is not None:
                plan, views = found
                dtype = self.target_dtype(name, plan)
                if plan.axes is None and dtype == torch_dtype_of(plan.np_dtype):
                    arr, tensor = self._empty(len(idx), plan, dtype, plan.np_dtype)
                    gather_rows(views, idx, arr.reshape(len(idx), -1))
                    out[name] = tensor if tensor is not None else torch.from_numpy(arr)
                    continue
            out[name] = self.collate_column(name, column.take(pa.array(idx)))
        return out

    def collate_spans(
        self, table: pa.Table, spans: tuple[tuple[BlockViews, int, int], ...]
    ) -> dict[str, torch.Tensor | list]:
        """``self(table)`` for a ``table`` made of rows ``[start, stop)`` of each span's
        block, in order (stage 3 sends these). Fixed-width columns are copied from views
        of the blocks worked out once per block; the batch's hot path is then one numpy
        allocation, one copy per span and one ``torch.from_numpy`` per column, with no
        pyarrow call. Other columns are collated from ``table`` as usual."""
        table = self.check_table(table)
        n = table.num_rows
        out: dict[str, torch.Tensor | list] = {}
        for i, name in enumerate(table.schema.names):
            tensor = self._from_spans(name, spans, n)
            # The table's column only when needed: wrapping every column is a pyarrow call
            # per column and batch, which this path exists to avoid.
            out[name] = tensor if tensor is not None else self.collate_column(name, table.column(i))
        return out

    def _from_spans(
        self, name: str, spans: tuple[tuple[BlockViews, int, int], ...], n: int
    ) -> torch.Tensor | None:
        found = span_views(name, spans)
        if found is None:
            return None
        plan, views = found
        dtype = self.target_dtype(name, plan)
        np_dtype = _numpy_dtype(dtype)
        if plan.axes is not None or np_dtype is None:
            return None  # a permuted Arrow tensor, or bfloat16: the general path
        arr, tensor = self._empty(n, plan, dtype, np_dtype)
        flat = arr.reshape(n, -1)
        pos = 0
        for view in views:
            np.copyto(flat[pos : pos + len(view)], view, casting="unsafe")
            pos += len(view)
        if pos != n:
            raise AssertionError(f"column {name!r}: spans cover {pos} rows, the batch has {n}")
        return tensor if tensor is not None else torch.from_numpy(arr)

    def _empty(
        self, n: int, plan: Plan, dtype: torch.dtype, np_dtype: np.dtype
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """An uninitialised (n, *plan.shape) output of ``dtype`` (numpy: ``np_dtype``) as
        numpy, and the allocator's tensor when it has to be returned as is (a user hook,
        e.g. pinned memory)."""
        shape = (n, *plan.shape)
        if self.allocator is None:
            return np.empty(shape, np_dtype), None
        if hasattr(self.allocator, "empty_numpy"):
            return self.allocator.empty_numpy(shape, np_dtype), None  # BufferPool: no torch call
        tensor = allocate(self.allocator, shape, dtype)
        return tensor.numpy(), tensor

    def check_table(self, table: pa.Table | pa.RecordBatch) -> pa.Table:
        """Validate `table` against this collate's settings; return it as a Table."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise TypeError(
                f"expected a pyarrow.Table, got {type(table).__name__}: use "
                "batch_format='pyarrow' when iterating the Ray Dataset"
            )
        names = table.schema.names
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"table has duplicate column names {dupes}: rename them first")
        self.check_columns(names)
        return table

    def check_columns(self, names: list[str]) -> None:
        """Raise `ValueError` if `dtypes` names a column not in `names`. Called on every
        table, and by `RayIterableDataset` at construction when the schema is known."""
        if isinstance(self.dtypes, dict):
            unknown = [c for c in self.dtypes if c not in names]
            if unknown:
                raise ValueError(
                    f"dtypes names column(s) {unknown} not in the table; available columns: {names}"
                )

    def collate_column(self, name: str, column: pa.ChunkedArray) -> torch.Tensor | list:
        """Collate one column (a tensor, or a list for string/binary columns)."""
        plan = self.cached_plan(name, column.type, plan_column)
        if plan.kind == "pylist":
            if isinstance(self.dtypes, dict) and name in self.dtypes:
                raise ValueError(
                    f"dtypes[{name!r}] is set but column {name!r} (type {column.type}) "
                    "becomes a Python list, not a tensor: remove it from dtypes"
                )
            return column.to_pylist()
        return collate_tensor(name, column, plan, self.target_dtype(name, plan), self.allocator)

    def cached_plan(
        self, name: str, typ: pa.DataType, planner: Callable[[str, pa.DataType], Plan]
    ) -> Plan:
        """`planner(name, typ)`, cached; PadCollate shares it for its list columns.

        Errors are not cached: a bad column raises again on every call.
        """
        key = (planner, name, typ)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 1024:  # a schema that keeps changing: stay bounded
                self._plans.clear()
            plan = self._plans[key] = planner(name, typ)
        return plan

    def target_dtype(self, name: str, plan: Plan) -> torch.dtype:
        """The output dtype of tensor column `name`, after applying `dtypes`."""
        assert plan.out_dtype is not None
        if isinstance(self.dtypes, dict):
            return self.dtypes.get(name, plan.out_dtype)
        if self.dtypes is not None and plan.numeric:
            return self.dtypes
        return plan.out_dtype
