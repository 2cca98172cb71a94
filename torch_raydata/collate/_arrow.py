"""Arrow -> numpy -> torch plumbing shared by the collate strategies.

This module owns the type rules (which Arrow types become tensors, which become
Python lists, which are rejected and with what advice), the zero-copy numpy views
of Arrow chunks, and the single copy from those views into the output tensor.
Nothing here loops over rows in Python.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

__all__ = [
    "ARROW_FIXED_TENSOR",
    "RAY_FIXED_TENSORS",
    "RAY_VARIABLE_TENSOR",
    "Allocator",
    "Plan",
    "allocate",
    "chunk_leaf",
    "collate_tensor",
    "copy_into",
    "is_variable_list",
    "leaf_to_numpy",
    "normalize_dtypes",
    "null_error",
    "plan_column",
    "ragged_error",
    "torch_dtype_of",
]

Allocator = Callable[[tuple, torch.dtype], torch.Tensor]

# Ray's fixed-shape tensor types store rows in a list/large_list child; matched by
# extension name so the same code serves `ray.data._internal.tensor_extensions`
# and its `ray.air.util.tensor_extensions` alias without importing Ray.
RAY_FIXED_TENSORS = frozenset({"ray.data.arrow_tensor", "ray.data.arrow_tensor_v2"})
RAY_VARIABLE_TENSOR = "ray.data.arrow_variable_shaped_tensor"
ARROW_FIXED_TENSOR = "arrow.fixed_shape_tensor"

ALLOWED_DTYPES = frozenset(
    {
        torch.bool,
        *(torch.uint8, torch.uint16, torch.uint32, torch.uint64),
        *(torch.int8, torch.int16, torch.int32, torch.int64),
        *(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    }
)


@dataclass(frozen=True)
class Plan:
    """How one Arrow type is collated.

    kind "tensor": rows become a (num_rows, *shape) tensor whose leaf values are read
    as `np_dtype` (the physical type), transposed by `axes` when a native Arrow
    tensor carries a permutation. kind "pylist": rows become a Python list.
    """

    kind: str
    shape: tuple[int, ...] = ()
    np_dtype: np.dtype | None = None
    out_dtype: torch.dtype | None = None
    numeric: bool = False  # int/float leaf: a single `dtypes` value applies to it
    axes: tuple[int, ...] | None = None


def torch_dtype_of(np_dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype


def _is_temporal(t: pa.DataType) -> bool:
    return (
        pa.types.is_timestamp(t)
        or pa.types.is_date(t)
        or pa.types.is_time(t)
        or pa.types.is_duration(t)
    )


def _is_bytes_like(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary_view(t)
    )


def is_variable_list(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    )


def _ext_name(t: pa.DataType) -> str | None:
    return t.extension_name if isinstance(t, pa.BaseExtensionType) else None


def ragged_error(name: str, typ: pa.DataType) -> ValueError:
    pad = f"trd.collate.PadCollate(columns=[{name!r}])"
    if _ext_name(typ) == RAY_VARIABLE_TENSOR and typ.ndim != 1:
        fix = (
            f"holds variable-shaped {typ.ndim}-D tensors, which cannot be stacked: resize or "
            "pad them to one shape in a map_batches step (PadCollate pads 1-D sequences only)"
        )
    elif pa.types.is_list_view(typ) or pa.types.is_large_list_view(typ):
        fix = f"is variable-length: cast it to pyarrow.list_(...) and use {pad}"
    elif is_variable_list(typ) or _ext_name(typ) == RAY_VARIABLE_TENSOR:
        fix = f"is variable-length: use {pad}"
    else:
        fix = (
            "nests variable-length lists inside fixed-size ones, which can be neither stacked "
            "nor padded: restructure it in a map_batches step"
        )
    return ValueError(f"column {name!r} (type {typ}) {fix}")


def _unsupported_error(name: str, typ: pa.DataType) -> ValueError:
    if pa.types.is_decimal(typ):
        fix = "cast it to float64 (pyarrow.compute.cast) in a map_batches step"
    elif pa.types.is_struct(typ):
        fix = "flatten it into separate columns (pyarrow.Table.flatten) in a map_batches step"
    else:
        fix = f"convert it in a map_batches step or drop it (ds.drop_columns([{name!r}]))"
    return ValueError(f"column {name!r} has Arrow type {typ}, which has no tensor form: {fix}")


def null_error(name: str, count: int) -> ValueError:
    return ValueError(
        f"column {name!r} has {count} null value(s), which a tensor cannot hold: fill them "
        f"in a map_batches step first, e.g. pyarrow.compute.fill_null(batch[{name!r}], 0)"
    )


def plan_column(name: str, typ: pa.DataType) -> Plan:
    """The collation plan for `typ`; raises ValueError for ragged or unsupported types."""
    if _is_bytes_like(typ) or (pa.types.is_dictionary(typ) and _is_bytes_like(typ.value_type)):
        return Plan("pylist")
    phys_shape: list[int] = []
    axes: list[int] = []
    t = typ
    while True:  # peel fixed-shape layers off until the leaf type
        ext = _ext_name(t)
        if ext in RAY_FIXED_TENSORS:
            dims = [int(d) for d in t.shape]
            axes += range(len(phys_shape), len(phys_shape) + len(dims))
            t = t.storage_type.value_type
        elif ext == ARROW_FIXED_TENSOR:
            dims = [int(d) for d in t.shape]
            axes += [len(phys_shape) + int(p) for p in (t.permutation or range(len(dims)))]
            t = t.storage_type.value_type
        elif pa.types.is_fixed_size_list(t):
            dims = [t.list_size]
            axes.append(len(phys_shape))
            t = t.value_type
        else:
            break
        phys_shape += dims
    if is_variable_list(t) or _ext_name(t) == RAY_VARIABLE_TENSOR:
        raise ragged_error(name, typ)
    if pa.types.is_dictionary(t) and t is typ and _is_numeric(t.value_type):
        np_dtype = np.dtype(t.value_type.to_pandas_dtype())
        return Plan("tensor", (), np_dtype, torch_dtype_of(np_dtype), True)
    if pa.types.is_boolean(t):
        np_dtype, numeric = np.dtype(np.bool_), False
    elif _is_numeric(t):
        np_dtype, numeric = np.dtype(t.to_pandas_dtype()), True
    elif _is_temporal(t):
        np_dtype, numeric = np.dtype(np.int64 if t.bit_width == 64 else np.int32), False
    else:
        raise _unsupported_error(name, typ)
    out = torch.int64 if _is_temporal(t) else torch_dtype_of(np_dtype)
    identity = axes == list(range(len(axes)))
    shape = tuple(phys_shape[a] for a in axes)
    return Plan("tensor", shape, np_dtype, out, numeric, None if identity else tuple(axes))


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def chunk_leaf(name: str, arr: pa.Array) -> tuple[pa.Array, int]:
    """The flat leaf values under `arr`'s rows (a zero-copy slice) and their null count.

    `.values` ignores the parent's slice offset, so every layer re-slices its child to
    the rows actually in `arr`. Stops early (leaf None) when a null list row makes the
    offsets meaningless.
    """
    nulls = 0
    while True:
        ext = _ext_name(arr.type)
        if ext is not None:
            expected = math.prod(int(d) for d in arr.type.shape)
            # The storage carries the extension array's slice and validity; a native
            # Arrow tensor's storage is a fixed_size_list, handled on the next pass.
            arr = arr.storage
            if ext in RAY_FIXED_TENSORS:
                nulls += arr.null_count
                if nulls or len(arr) == 0:
                    return (None if nulls else arr.values.slice(0, 0)), nulls
                offsets = arr.offsets.to_numpy()
                if (np.diff(offsets) != expected).any():
                    raise ValueError(
                        f"column {name!r}: Ray tensor rows of type {arr.type} do not all "
                        f"hold {expected} values; the column is malformed"
                    )
                start = int(offsets[0])
                arr = arr.values.slice(start, int(offsets[-1]) - start)
        elif pa.types.is_fixed_size_list(arr.type):
            nulls += arr.null_count
            k = arr.type.list_size
            arr = arr.values.slice(arr.offset * k, len(arr) * k)
        else:
            nulls += arr.null_count
            if pa.types.is_dictionary(arr.type):
                nulls += arr.dictionary.null_count
            return arr, nulls


def leaf_to_numpy(leaf: pa.Array, num_rows: int, plan: Plan) -> tuple[np.ndarray, bool]:
    """A (num_rows, *plan.shape) array over `leaf` and whether it is freshly owned.

    Fixed-width leaves are viewed in place (no copy); bit-packed bools and
    dictionary lookups have no view, so they come back as new arrays.
    """
    phys = (num_rows, *(plan.shape if plan.axes is None else _phys(plan)))
    if pa.types.is_boolean(leaf.type):
        view, owned = leaf.to_numpy(zero_copy_only=False), True
    elif pa.types.is_dictionary(leaf.type):
        values, _ = leaf_to_numpy(leaf.dictionary, len(leaf.dictionary), plan)
        indices, _ = leaf_to_numpy(leaf.indices, len(leaf), _index_plan(leaf.indices.type))
        view, owned = np.take(values, indices, axis=0, mode="clip"), True
    elif len(leaf) == 0:
        view, owned = np.empty(0, dtype=plan.np_dtype), True
    else:
        itemsize = plan.np_dtype.itemsize
        buf = leaf.buffers()[1]
        view = np.frombuffer(buf, plan.np_dtype, count=len(leaf), offset=leaf.offset * itemsize)
        owned = False
    view = view.reshape(phys)
    if plan.axes is not None:
        view = view.transpose(0, *(1 + a for a in plan.axes))
    return view, owned


def _phys(plan: Plan) -> tuple[int, ...]:
    assert plan.axes is not None
    phys = [0] * len(plan.axes)
    for logical, a in enumerate(plan.axes):
        phys[a] = plan.shape[logical]
    return tuple(phys)


def _index_plan(t: pa.DataType) -> Plan:
    np_dtype = np.dtype(t.to_pandas_dtype())
    return Plan("tensor", (), np_dtype, torch_dtype_of(np_dtype), True)


def normalize_dtypes(dtypes: object) -> torch.dtype | dict[str, torch.dtype] | None:
    """Validate the `dtypes` argument at construction time."""

    def check(value: object, where: str) -> torch.dtype:
        if not isinstance(value, torch.dtype) or value not in ALLOWED_DTYPES:
            raise TypeError(
                f"{where}={value!r} is not a supported torch.dtype: use one of "
                f"{sorted(str(d) for d in ALLOWED_DTYPES)}"
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


def allocate(allocator: Allocator | None, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The output tensor, from the allocation hook when one was given."""
    shape = tuple(int(s) for s in shape)
    if allocator is None:
        return torch.empty(shape, dtype=dtype)
    out = allocator(shape, dtype)
    if (
        not isinstance(out, torch.Tensor)
        or tuple(out.shape) != shape
        or out.dtype != dtype
        or out.device.type != "cpu"
        or not out.is_contiguous()
    ):
        got = (
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
            if isinstance(out, torch.Tensor)
            else type(out).__name__
        )
        raise ValueError(
            f"allocator{(shape, dtype)} returned {got}: it must return a contiguous CPU "
            f"tensor (pinned is fine) of exactly that shape and dtype"
        )
    return out


def copy_into(out: torch.Tensor, start: int, src: np.ndarray) -> None:
    """Copy `src` into rows [start, start+len(src)) of `out`, casting in the same pass."""
    stop = start + len(src)
    if out.dtype == torch.bfloat16:  # numpy has no bfloat16: let torch cast-copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only Arrow view
            out[start:stop].copy_(torch.from_numpy(src))
    else:
        np.copyto(out.numpy()[start:stop], src, casting="unsafe")


def collate_tensor(
    name: str, column: pa.ChunkedArray, plan: Plan, dtype: torch.dtype, allocator: Allocator | None
) -> torch.Tensor:
    """One (num_rows, *plan.shape) tensor owning its memory, built with one copy."""
    parts, nulls = [], 0
    for chunk in column.chunks:
        if len(chunk):
            leaf, chunk_nulls = chunk_leaf(name, chunk)
            parts.append((leaf, len(chunk)))
            nulls += chunk_nulls
    if nulls:
        raise null_error(name, nulls)
    views = [leaf_to_numpy(leaf, rows, plan) for leaf, rows in parts]
    if allocator is None and len(views) == 1:
        view, owned = views[0]
        if owned and view.flags.c_contiguous and torch_dtype_of(view.dtype) == dtype:
            return torch.from_numpy(view)  # already a private array: no second copy
    out = allocate(allocator, (len(column), *plan.shape), dtype)
    start = 0
    for view, _ in views:
        copy_into(out, start, view)
        start += len(view)
    assert start == len(column)
    return out
