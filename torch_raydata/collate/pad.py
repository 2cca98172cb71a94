"""`PadCollate`: variable-length list columns -> padded tensors plus masks.

This module owns padding, truncation and mask building, all vectorised from the
Arrow offsets; every other column is delegated to `DefaultCollate`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from torch_raydata._checks import check_int
from torch_raydata.collate.default import DefaultCollate
from torch_raydata.kernels.arrow import (
    RAY_VARIABLE_TENSOR,
    Allocator,
    Plan,
    allocate,
    as_torch,
    chunk_leaf,
    is_variable_list,
    leaf_to_numpy,
    plan_column,
    ragged_error,
)

__all__ = ["PadCollate"]


class PadCollate:
    """Pad variable-length list columns into `(B, L, *item_shape)` tensors with masks.

    Each listed column `c` yields `c` (padded values, `pad_value` after each row's
    end) and `c_mask` (bool `(B, L)`, True where a real item sits). `L` is the
    longest row in the batch, capped at `max_length` (longer rows are truncated,
    keeping their first `max_length` items), then rounded up to a multiple of
    `pad_to_multiple_of` (so `L` may exceed `max_length`; the extra slots are padding).

    Listed columns may be `list`, `large_list`, `fixed_size_list` (every row the same
    length, so with no cap or rounding it comes out as-is with an all-True mask), or
    Ray's 1-D variable-shaped tensor type. Items may be numbers, bools, temporals
    (-> int64) or fixed-shape tensors (e.g. `list<fixed_size_list<float, 3>>` ->
    `(B, L, 3)`). Every other column goes through `DefaultCollate`.

    Null handling: a null row is *not* read as an empty row — a null row or a null
    item raises `ValueError` naming the column, since silently padding would hide
    missing data. Replace nulls (e.g. with `[]`) in a map_batches step if intended.

    Args:
        columns: list of column names to pad (a bare string is rejected).
        pad_value: scalar fill for padding, or a dict `{column: scalar}` (columns
            missing from the dict pad with 0).
        max_length: cap on `L`, >= 1; None for no cap.
        pad_to_multiple_of: round `L` up to a multiple of this, >= 1; None to not round.
        dtypes: as for `DefaultCollate`; applies to the padded values too (masks stay bool).
        allocator: as for `DefaultCollate`; used for the padded values and masks too.
    """

    def __init__(
        self,
        columns: Sequence[str],
        pad_value: float | Mapping[str, float] = 0,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        *,
        dtypes: torch.dtype | dict[str, torch.dtype] | None = None,
        allocator: Allocator | None = None,
    ) -> None:
        self.columns = _check_columns(columns)
        self.pad_value = _check_pad_value(pad_value, self.columns)
        self.max_length = check_int("max_length", max_length, 1, allow_none=True)
        self.pad_to_multiple_of = check_int("pad_to_multiple_of", pad_to_multiple_of, 1, allow_none=True)
        self._default = DefaultCollate(dtypes, allocator=allocator)

    @property
    def dtypes(self) -> torch.dtype | dict[str, torch.dtype] | None:
        """The ``dtypes`` given (validated), e.g. to build a copy with another allocator."""
        return self._default.dtypes

    def __repr__(self) -> str:
        return (
            f"PadCollate(columns={self.columns!r}, pad_value={self.pad_value!r}, "
            f"max_length={self.max_length!r}, pad_to_multiple_of={self.pad_to_multiple_of!r}, "
            f"dtypes={self._default.dtypes!r}, allocator={self._default.allocator!r})"
        )

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor | list]:
        table = self._default.check_table(table)
        names = table.schema.names
        self.check_columns(names)
        out: dict[str, torch.Tensor | list] = {}
        for name, column in zip(names, table.columns, strict=True):
            if name in self.columns:
                out[name], out[f"{name}_mask"] = self._pad(name, column)
            else:
                out[name] = self._default.collate_column(name, column)
        return out

    def check_columns(self, names: list[str]) -> None:
        """Raise `ValueError` if a padded column (or a `dtypes` key) is not in `names`, or
        a mask name is taken. Called on every table, and by `RayIterableDataset` at
        construction when the schema is known."""
        self._default.check_columns(names)
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise ValueError(
                f"PadCollate columns {missing} are not in the table; available columns: {names}"
            )
        clash = [f"{c}_mask" for c in self.columns if f"{c}_mask" in names]
        if clash:
            raise ValueError(
                f"table already has column(s) {clash}, which PadCollate would overwrite "
                "with masks: rename them first"
            )

    def _pad(self, name: str, column: pa.ChunkedArray) -> tuple[torch.Tensor, torch.Tensor]:
        item = self._default.cached_plan(name, column.type, _item_plan)
        parts, nulls = [], 0
        for chunk in column.chunks:
            if len(chunk):
                offsets, values, row_nulls = _list_parts(chunk)
                leaf, item_nulls = (None, 0) if row_nulls else chunk_leaf(name, values, item)
                nulls += row_nulls + item_nulls
                lengths = np.diff(offsets)
                parts.append((offsets, lengths, leaf, len(values)))
        if nulls:
            raise ValueError(
                f"column {name!r} has {nulls} null row(s) or item(s); PadCollate does not "
                "read a null row as empty: fill them in a map_batches step first (e.g. "
                "replace null rows with [] and fill_null the items)"
            )
        longest = max((int(p[1].max()) for p in parts), default=0)
        # Rows keep at most `keep` items; rounding up may make `width` exceed that.
        keep = longest if self.max_length is None else min(longest, self.max_length)
        width = keep
        if self.pad_to_multiple_of is not None:
            width = -(-keep // self.pad_to_multiple_of) * self.pad_to_multiple_of

        dtype = self._default.target_dtype(name, item)
        pad = self.pad_value.get(name, 0) if isinstance(self.pad_value, dict) else self.pad_value
        _check_pad_fits(name, pad, dtype)
        allocator = self._default.allocator
        values_out = allocate(allocator, (len(column), width, *item.shape), dtype)
        mask = allocate(allocator, (len(column), width), torch.bool)
        if width > keep or any((p[1] < keep).any() for p in parts):
            # numpy's fill, not torch's fill_: on busy collate threads torch's (two intra-op
            # threads) took a median 4.1 ms on a (256, 512) int32 tensor, numpy ~19 us.
            if values_out.dtype == torch.bfloat16:
                values_out.fill_(pad)
            else:
                values_out.numpy().fill(pad)  # only skipped when every slot gets a real item

        mask_np, positions, start = mask.numpy(), np.arange(width), 0
        for offsets, lengths, leaf, num_values in parts:
            stop = start + len(lengths)
            view, _ = leaf_to_numpy(leaf, num_values, item)
            row_mask = mask_np[start:stop]
            np.less(positions, np.minimum(lengths, keep)[:, None], out=row_mask)
            if lengths.max() > keep:  # truncate: keep each row's first `keep` items
                within_row = np.arange(num_values) - np.repeat(offsets[:-1] - offsets[0], lengths)
                view = view[within_row < keep]
            _scatter(values_out, start, stop, row_mask, view)
            start = stop
        assert start == len(column)
        return values_out, mask


def _item_plan(name: str, typ: pa.DataType) -> Plan:
    """The plan for one item of list column `name`; raises if it cannot be padded."""
    if isinstance(typ, pa.BaseExtensionType) and typ.extension_name == RAY_VARIABLE_TENSOR:
        if typ.ndim != 1:
            raise ragged_error(name, typ)
        inner = typ.storage_type["data"].type.value_type
    elif is_variable_list(typ) and not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
        raise ragged_error(name, typ)  # list_view: tells the user to cast to list
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        inner = typ.value_type
    else:
        raise ValueError(
            f"column {name!r} (type {typ}) is not a list column, so PadCollate cannot pad "
            f"it: remove {name!r} from columns=[...]"
        )
    if is_variable_list(inner) or getattr(inner, "extension_name", None) == RAY_VARIABLE_TENSOR:
        raise ValueError(
            f"column {name!r} (type {typ}) nests variable-length lists; PadCollate pads one "
            "level only: flatten or pad the inner level in a map_batches step"
        )
    plan = plan_column(name, inner)
    if plan.kind != "tensor":
        raise ValueError(
            f"column {name!r} (type {typ}) holds {inner} items, which have no tensor form: "
            "encode them as numbers (e.g. tokenize) in a map_batches step"
        )
    return plan


def _list_parts(chunk: pa.Array) -> tuple[np.ndarray, pa.Array, int]:
    """(offsets relative to `values`, the values of exactly these rows, null rows)."""
    if isinstance(chunk.type, pa.BaseExtensionType):  # Ray 1-D variable-shaped tensor
        storage = chunk.storage
        if storage.null_count:
            return np.zeros(len(chunk) + 1, np.int64), storage.field("data"), storage.null_count
        chunk = storage.field("data")  # `field` applies the struct's slice offset
    if pa.types.is_fixed_size_list(chunk.type):
        k = chunk.type.list_size
        offsets = np.arange(len(chunk) + 1, dtype=np.int64) * k
        return offsets, chunk.values.slice(chunk.offset * k, len(chunk) * k), chunk.null_count
    if chunk.null_count:  # offsets of null rows are unspecified: do not read them
        return np.zeros(len(chunk) + 1, np.int64), chunk.values, chunk.null_count
    offsets = chunk.offsets.to_numpy().astype(np.int64)  # sliced: need not start at 0
    first = int(offsets[0])
    return offsets - first, chunk.values.slice(first, int(offsets[-1]) - first), 0


def _scatter(out: torch.Tensor, start: int, stop: int, row_mask: np.ndarray, items) -> None:
    """Write `items` into the True slots of `row_mask` in rows [start, stop) of `out`."""
    if out.dtype == torch.bfloat16:  # numpy has no bfloat16: let torch cast
        out[start:stop][torch.from_numpy(row_mask)] = as_torch(items).to(out.dtype)
    else:
        out.numpy()[start:stop][row_mask] = items


def _check_columns(columns: object) -> list[str]:
    if isinstance(columns, str):
        raise ValueError(f"columns={columns!r} is a single string: pass a list, [{columns!r}]")
    if not isinstance(columns, Sequence | set | frozenset) or not columns:
        raise ValueError(f"columns={columns!r} must be a non-empty list of column names")
    bad = [c for c in columns if not isinstance(c, str)]
    if bad:
        raise ValueError(f"columns={columns!r} holds non-string name(s) {bad}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"columns={columns!r} lists a column twice")
    return list(columns)


def _check_pad_value(pad_value: object, columns: list[str]) -> float | dict[str, float]:
    def scalar(value: object, where: str) -> float:
        if not isinstance(value, numbers.Real):
            raise ValueError(f"{where}={value!r} must be a real number (int, float or bool)")
        return value

    if isinstance(pad_value, Mapping):
        unknown = [c for c in pad_value if c not in columns]
        if unknown:
            raise ValueError(
                f"pad_value names column(s) {unknown} that are not padded; columns={columns}"
            )
        return {c: scalar(v, f"pad_value[{c!r}]") for c, v in pad_value.items()}
    return scalar(pad_value, "pad_value")


def _check_pad_fits(name: str, pad: float, dtype: torch.dtype) -> None:
    """Refuse a pad value the output dtype would silently change (0.5 -> 0, -1 -> 255)."""
    if dtype.is_floating_point:
        return
    low, high = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    if not math.isfinite(pad) or float(pad) != int(pad) or not low <= int(pad) <= high:
        raise ValueError(
            f"pad_value={pad!r} for column {name!r} does not fit its dtype {dtype}: "
            "choose a pad value in range or cast the column with dtypes={...}"
        )
