"""Arrow -> numpy -> torch plumbing shared by the collate strategies.

This module owns the type rules (which Arrow types become tensors, which become
Python lists, which are rejected and with what advice), the zero-copy numpy views
of Arrow chunks, and the single copy from those views into the output tensor.
Nothing here loops over rows in Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    "as_torch",
    "chunk_leaf",
    "collate_tensor",
    "copy_into",
    "ext_name",
    "is_variable_list",
    "leaf_to_numpy",
    "null_error",
    "plan_column",
    "primitive_view",
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


@dataclass(frozen=True)
class Plan:
    """How one Arrow type is collated; computed once per (column, type) and cached.

    kind "tensor": rows become a (num_rows, *shape) tensor. `layers` says how to
    reach the flat leaf from a chunk ("ray": Ray tensor list storage of `size` values
    per row; "ext": unwrap extension storage; "fsl": fixed_size_list of `size`), so
    chunks are walked without re-inspecting their types. The leaf is read as
    `np_dtype` (its physical type) laid out as (num_rows, *phys), then transposed by
    `axes` when a native Arrow tensor carries a permutation (else phys == shape).
    kind "pylist": rows become a Python list.
    """

    kind: str
    shape: tuple[int, ...] = ()
    phys: tuple[int, ...] = ()
    np_dtype: np.dtype | None = None
    out_dtype: torch.dtype | None = None
    numeric: bool = False  # int/float leaf: a single `dtypes` value applies to it
    axes: tuple[int, ...] | None = None
    layers: tuple[tuple[str, int], ...] = ()
    dictionary: bool = False  # leaf is a dictionary array of numbers: decode it


_TORCH_DTYPES: dict[np.dtype, torch.dtype] = {}


def torch_dtype_of(np_dtype: np.dtype) -> torch.dtype:
    if np_dtype not in _TORCH_DTYPES:
        _TORCH_DTYPES[np_dtype] = torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype
    return _TORCH_DTYPES[np_dtype]


_TEMPORAL = ("is_timestamp", "is_date", "is_time", "is_duration")
_BYTES_LIKE = ("is_string", "is_large_string", "is_string_view", "is_binary")
_BYTES_LIKE += ("is_large_binary", "is_binary_view", "is_fixed_size_binary")
_VARIABLE_LISTS = ("is_list", "is_large_list", "is_list_view", "is_large_list_view")


def _is(predicates: tuple[str, ...], t: pa.DataType) -> bool:
    # Older pyarrow lacks the *_view predicates (and so cannot produce those types).
    return any(getattr(pa.types, p, lambda _: False)(t) for p in predicates)


def is_variable_list(t: pa.DataType) -> bool:
    return _is(_VARIABLE_LISTS, t)


def ext_name(t: pa.DataType) -> str | None:
    return t.extension_name if isinstance(t, pa.BaseExtensionType) else None


def ragged_error(name: str, typ: pa.DataType) -> ValueError:
    pad = f"trd.collate.PadCollate(columns=[{name!r}])"
    if ext_name(typ) == RAY_VARIABLE_TENSOR and typ.ndim != 1:
        fix = (
            f"holds variable-shaped {typ.ndim}-D tensors, which cannot be stacked: resize or "
            "pad them to one shape in a map_batches step (PadCollate pads 1-D sequences only)"
        )
    elif _is(("is_list_view", "is_large_list_view"), typ):
        fix = f"is variable-length: cast it to pyarrow.list_(...) and use {pad}"
    elif is_variable_list(typ) or ext_name(typ) == RAY_VARIABLE_TENSOR:
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
    if _is(_BYTES_LIKE, typ) or (pa.types.is_dictionary(typ) and _is(_BYTES_LIKE, typ.value_type)):
        return Plan("pylist")
    phys: list[int] = []
    axes: list[int] = []
    layers: list[tuple[str, int]] = []
    t = typ
    while True:  # peel fixed-shape layers off until the leaf type
        ext = ext_name(t)
        if ext in RAY_FIXED_TENSORS or ext == ARROW_FIXED_TENSOR:
            dims = [int(d) for d in t.shape]
            perm = getattr(t, "permutation", None) or range(len(dims))
            axes += [len(phys) + int(p) for p in perm]
            if ext == ARROW_FIXED_TENSOR:  # storage: fixed_size_list of all the values
                layers += [("ext", 0), ("fsl", math.prod(dims))]
            else:
                layers.append(("ray", math.prod(dims)))
            t = t.storage_type.value_type
        elif pa.types.is_fixed_size_list(t):
            dims = [t.list_size]
            axes.append(len(phys))
            layers.append(("fsl", t.list_size))
            t = t.value_type
        else:
            break
        phys += dims
    if is_variable_list(t) or ext_name(t) == RAY_VARIABLE_TENSOR:
        raise ragged_error(name, typ)
    dictionary = pa.types.is_dictionary(t) and t is typ and _is_numeric(t.value_type)
    leaf = t.value_type if dictionary else t
    if pa.types.is_boolean(leaf):
        np_dtype = np.dtype(np.bool_)
    elif _is_numeric(leaf):
        np_dtype = np.dtype(leaf.to_pandas_dtype())
    elif _is(_TEMPORAL, leaf):
        np_dtype = np.dtype(np.int64 if leaf.bit_width == 64 else np.int32)
    else:
        raise _unsupported_error(name, typ)
    out = torch.int64 if _is(_TEMPORAL, leaf) else torch_dtype_of(np_dtype)
    shape = tuple(phys[a] for a in axes)
    identity = axes == list(range(len(axes)))
    return Plan(
        "tensor",
        shape,
        tuple(phys),
        np_dtype,
        out,
        _is_numeric(leaf),
        None if identity else tuple(axes),
        tuple(layers),
        dictionary,
    )


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def chunk_leaf(name: str, arr: pa.Array, plan: Plan) -> tuple[pa.Array | None, int]:
    """The flat leaf values under `arr`'s rows (a zero-copy slice) and their null count.

    `.values` ignores the parent's slice offset, so every layer re-slices its child to
    the rows actually in `arr`. Returns leaf None when a null Ray tensor row makes the
    offsets meaningless.
    """
    nulls = 0
    for layer, size in plan.layers:
        if layer == "ext":  # storage keeps the extension array's slice and validity
            arr = arr.storage
        elif layer == "fsl":
            nulls += arr.null_count
            arr = arr.values.slice(arr.offset * size, len(arr) * size)
        else:  # "ray": list storage, `size` values per row by the type's contract
            arr = arr.storage
            nulls += arr.null_count
            if nulls or not len(arr):
                return (None if nulls else arr.values.slice(0, 0)), nulls
            offsets = arr.offsets.to_numpy()
            first, last = int(offsets[0]), int(offsets[-1])
            # The type promises `size` values per row; checking the span (not every
            # row) keeps this O(1) and still catches storage that breaks the promise.
            if last - first != len(arr) * size:
                raise ValueError(
                    f"column {name!r}: Ray tensor storage {arr.type} spans {last - first} "
                    f"values for {len(arr)} rows of {size}; the column is malformed"
                )
            arr = arr.values.slice(first, last - first)
    nulls += arr.null_count + (arr.dictionary.null_count if plan.dictionary else 0)
    return arr, nulls


def primitive_view(arr: pa.Array, np_dtype: np.dtype) -> np.ndarray:
    """Zero-copy view of a null-free fixed-width array, honouring its slice offset."""
    if len(arr) == 0:
        return np.empty(0, dtype=np_dtype)
    offset = arr.offset * np_dtype.itemsize
    return np.frombuffer(arr.buffers()[1], np_dtype, count=len(arr), offset=offset)


def leaf_to_numpy(leaf: pa.Array, num_rows: int, plan: Plan) -> tuple[np.ndarray, bool]:
    """A (num_rows, *plan.shape) array over `leaf` and whether it is freshly owned.

    Fixed-width leaves are viewed in place (no copy); bit-packed bools and
    dictionary lookups have no view, so they come back as new arrays.
    """
    if plan.dictionary:
        values = primitive_view(leaf.dictionary, plan.np_dtype)
        indices = leaf.indices.to_numpy(zero_copy_only=True)  # no nulls: checked before
        view, owned = np.take(values, indices, axis=0, mode="clip"), True
    elif plan.np_dtype == np.bool_:
        view, owned = leaf.to_numpy(zero_copy_only=False), True
    else:
        view, owned = primitive_view(leaf, plan.np_dtype), False
    view = view.reshape(num_rows, *plan.phys)
    if plan.axes is not None:
        view = view.transpose(0, *(1 + a for a in plan.axes))
    return view, owned


def allocate(allocator: Allocator | None, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The output tensor, from the allocation hook when one was given."""
    shape = tuple(int(s) for s in shape)
    if allocator is None:
        return torch.empty(shape, dtype=dtype)
    out = allocator(shape, dtype)
    ok = isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.is_contiguous()
    if not ok or tuple(out.shape) != shape or out.dtype != dtype:
        got = f"{out.dtype} {tuple(out.shape)} on {out.device}" if ok else repr(out)[:80]
        raise ValueError(
            f"allocator{(shape, dtype)} returned {got}: it must return a contiguous CPU "
            "tensor (pinned is fine) of exactly that shape and dtype"
        )
    return out


def as_torch(view: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy view of Arrow memory, for reading only.

    DLPack rather than `torch.from_numpy`: Arrow buffers from the object store are
    read-only, which `from_numpy` warns about (and silencing warnings is not
    thread-safe); DLPack carries the read-only flag without a warning.
    """
    return torch.from_dlpack(view)


def copy_into(out: torch.Tensor, start: int, src: np.ndarray) -> None:
    """Copy `src` into rows [start, start+len(src)) of `out`, casting in the same pass."""
    stop = start + len(src)
    if out.dtype == torch.bfloat16:  # numpy has no bfloat16: let torch cast-copy
        out[start:stop].copy_(as_torch(src))
    else:
        np.copyto(out.numpy()[start:stop], src, casting="unsafe")


def collate_tensor(
    name: str, column: pa.ChunkedArray, plan: Plan, dtype: torch.dtype, allocator: Allocator | None
) -> torch.Tensor:
    """One (num_rows, *plan.shape) tensor owning its memory, built with one copy."""
    parts, nulls = [], 0
    for chunk in column.chunks:
        if len(chunk):
            leaf, chunk_nulls = chunk_leaf(name, chunk, plan)
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
