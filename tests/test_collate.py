"""Unit tests for torch_raydata.collate (no Ray cluster needed)."""

from __future__ import annotations

import datetime
import decimal
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from ray.air.util.tensor_extensions.arrow import ArrowTensorType as AirArrowTensorType
from ray.data._internal.tensor_extensions.arrow import (
    ArrowTensorArray,
    ArrowTensorType,
    ArrowTensorTypeV2,
    ArrowVariableShapedTensorArray,
)

from torch_raydata.collate import DefaultCollate, PadCollate

# ---------------------------------------------------------------- helpers


def arrow_ranges(table: pa.Table) -> list[tuple[int, int]]:
    """Address ranges of every buffer behind `table` (children and dictionaries too)."""
    ranges = []

    def walk(arr: pa.Array) -> None:
        if isinstance(arr, pa.ExtensionArray):
            arr = arr.storage
        for buf in arr.buffers():
            if buf is not None:
                ranges.append((buf.address, buf.address + buf.size))
        if isinstance(arr, pa.DictionaryArray):
            walk(arr.dictionary)

    for column in table.columns:
        for chunk in column.chunks:
            walk(chunk)
    return ranges


def assert_owned(tensor: torch.Tensor, table: pa.Table) -> None:
    lo = tensor.data_ptr()
    hi = lo + tensor.numel() * tensor.element_size()
    for start, stop in arrow_ranges(table):
        assert hi <= start or lo >= stop, "tensor memory lies inside an Arrow buffer"


def multi_chunk_sliced(table: pa.Table, other: pa.Table | None = None) -> pa.Table:
    """Two tables concatenated (two chunks) then sliced across the chunk boundary."""
    sliced = pa.concat_tables([table, table if other is None else other]).slice(3, 10)
    assert sliced.column(0).num_chunks == 2
    return sliced


def ray_tensor(array: np.ndarray, v1: bool = False) -> pa.ExtensionArray:
    if not v1:
        return ArrowTensorArray.from_numpy(array)  # V2 by default in Ray 2.60
    typ = ArrowTensorType(array.shape[1:], pa.from_numpy_dtype(array.dtype))
    per_row = int(np.prod(array.shape[1:]))
    offsets = pa.array(np.arange(len(array) + 1, dtype=np.int32) * per_row)
    storage = pa.ListArray.from_arrays(offsets, pa.array(array.reshape(-1)))
    return pa.ExtensionArray.from_storage(typ, storage)


def ragged_tensor(rows: list[np.ndarray]) -> pa.ExtensionArray:
    return ArrowVariableShapedTensorArray.from_numpy(np.array(rows + [None], dtype=object)[:-1])


NUMERIC = [
    pa.int8(),
    pa.int16(),
    pa.int32(),
    pa.int64(),
    pa.uint8(),
    pa.uint16(),
    pa.uint32(),
    pa.uint64(),
    pa.float16(),
    pa.float32(),
    pa.float64(),
]


# ---------------------------------------------------------------- DefaultCollate: types


@pytest.mark.parametrize("typ", NUMERIC, ids=str)
def test_numeric_columns(typ):
    np_dtype = np.dtype(typ.to_pandas_dtype())
    values = (np.arange(9) * 11).astype(np_dtype)
    table = pa.table({"x": pa.array(values, typ)})
    out = DefaultCollate()(table)["x"]
    assert out.dtype == torch.from_numpy(values).dtype
    assert out.shape == (9,)
    np.testing.assert_array_equal(out.numpy(), values)
    sliced = multi_chunk_sliced(table)
    np.testing.assert_array_equal(DefaultCollate()(sliced)["x"].numpy(), np.tile(values, 2)[3:13])


@pytest.mark.parametrize("chunks", [1, 2])
def test_bool(chunks):
    rng = np.random.default_rng(0)
    values = rng.random(37) < 0.5
    table = pa.table({"b": values})
    if chunks == 2:
        table = pa.concat_tables([table, table]).slice(5, 50)  # bit offset 5
        values = np.concatenate([values, values])[5:55]
    out = DefaultCollate()(table)["b"]
    assert out.dtype == torch.bool
    np.testing.assert_array_equal(out.numpy(), values)
    out[:] = ~out
    assert table.column("b").to_numpy().tolist() == values.tolist()


def test_temporal_become_int64_physical_values():
    ts = [datetime.datetime(2024, 1, d, 12, 30) for d in range(1, 6)]
    table = pa.table(
        {
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "d32": pa.array([datetime.date(2024, 1, d) for d in range(1, 6)], pa.date32()),
            "d64": pa.array([datetime.date(2024, 1, d) for d in range(1, 6)], pa.date64()),
            "dur": pa.array([datetime.timedelta(seconds=s) for s in range(5)], pa.duration("ms")),
            "t64": pa.array([datetime.time(1, s) for s in range(5)], pa.time64("ns")),
        }
    )
    out = DefaultCollate()(table)
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        width = pa.int64() if col.type.bit_width == 64 else pa.int32()
        expected = np.asarray(col.view(width), dtype=np.int64)
        assert out[name].dtype == torch.int64, name
        np.testing.assert_array_equal(out[name].numpy(), expected)
    ts0 = int(datetime.datetime(2024, 1, 1, 12, 30, tzinfo=datetime.timezone.utc).timestamp())
    assert out["ts"][0].item() == ts0 * 1_000_000
    assert out["d32"][0].item() == (datetime.date(2024, 1, 1) - datetime.date(1970, 1, 1)).days


def test_strings_binary_dictionary_become_lists():
    words = ["a", "bb", None, "ccc", "a", "bb"]
    table = pa.table(
        {
            "s": pa.array(words, pa.string()),
            "ls": pa.array(words, pa.large_string()),
            "bin": pa.array([w and w.encode() for w in words], pa.binary()),
            "dict": pa.array(words, pa.string()).dictionary_encode(),
        }
    )
    out = DefaultCollate()(table)
    assert out["s"] == words and out["ls"] == words and out["dict"] == words
    assert out["bin"] == [w and w.encode() for w in words]
    sliced = multi_chunk_sliced(table)
    assert DefaultCollate()(sliced)["dict"] == (words * 2)[3:13]


def test_numeric_dictionary_is_decoded():
    values = [3.5, 1.0, 3.5, 2.0, 2.0, 1.0, 3.5, 3.5, 1.0]
    table = pa.table({"d": pa.array(values, pa.float32()).dictionary_encode()})
    out = DefaultCollate()(multi_chunk_sliced(table))["d"]
    assert out.dtype == torch.float32
    assert out.tolist() == (values * 2)[3:13]


def test_fixed_size_list_1d_and_nested():
    flat = np.arange(9 * 6, dtype=np.float32)
    one_d = pa.FixedSizeListArray.from_arrays(pa.array(flat), 6)
    nested = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, 3), 2)
    table = pa.table({"v": one_d, "m": nested})
    out = DefaultCollate()(table)
    np.testing.assert_array_equal(out["v"].numpy(), flat.reshape(9, 6))
    np.testing.assert_array_equal(out["m"].numpy(), flat.reshape(9, 2, 3))
    out = DefaultCollate()(multi_chunk_sliced(table))
    both = np.concatenate([flat, flat])
    np.testing.assert_array_equal(out["v"].numpy(), both.reshape(18, 6)[3:13])
    np.testing.assert_array_equal(out["m"].numpy(), both.reshape(18, 2, 3)[3:13])


@pytest.mark.parametrize("v1", [False, True], ids=["v2", "v1"])
@pytest.mark.parametrize("np_dtype", [np.uint8, np.float32, np.bool_])
def test_ray_tensor_extension(v1, np_dtype):
    data = (np.arange(9 * 3 * 4 * 5) % 7).astype(np_dtype).reshape(9, 3, 4, 5)
    arr = ray_tensor(data, v1=v1)
    assert isinstance(arr.type, ArrowTensorType if v1 else ArrowTensorTypeV2)
    table = pa.table({"img": arr})
    out = DefaultCollate()(table)["img"]
    assert out.shape == (9, 3, 4, 5)
    assert out.dtype == torch.from_numpy(data).dtype
    np.testing.assert_array_equal(out.numpy(), data)
    out = DefaultCollate()(multi_chunk_sliced(table))["img"]
    np.testing.assert_array_equal(out.numpy(), np.concatenate([data, data])[3:13])


def test_ray_air_alias_is_the_same_type():
    assert AirArrowTensorType is ArrowTensorType


def test_native_arrow_fixed_shape_tensor_with_permutation():
    data = np.arange(10 * 2 * 3, dtype=np.int32).reshape(10, 2, 3)
    plain = pa.FixedShapeTensorArray.from_numpy_ndarray(data)
    np.testing.assert_array_equal(DefaultCollate()(pa.table({"t": plain}))["t"].numpy(), data)
    typ = pa.fixed_shape_tensor(pa.int32(), (2, 3), permutation=[1, 0])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), 6)
    perm = pa.ExtensionArray.from_storage(typ, storage)
    table = pa.table({"t": perm})
    out = DefaultCollate()(table)["t"]
    np.testing.assert_array_equal(out.numpy(), perm.to_numpy_ndarray())
    out = DefaultCollate()(multi_chunk_sliced(table))["t"]
    expected = pa.concat_arrays([perm, perm]).slice(3, 10).to_numpy_ndarray()
    np.testing.assert_array_equal(out.numpy(), expected)


def test_mixed_multi_chunk_sliced_table():
    def make(seed: int) -> tuple[pa.Table, dict]:
        rng = np.random.default_rng(seed)
        cols = {
            "i": rng.integers(-100, 100, 9).astype(np.int16),
            "f": rng.random(9),
            "b": rng.random(9) < 0.5,
            "img": rng.integers(0, 255, (9, 2, 3), dtype=np.uint8),
        }
        table = pa.table(
            {
                "i": cols["i"],
                "f": cols["f"],
                "b": cols["b"],
                "img": ray_tensor(cols["img"]),
                "s": [f"s{seed}_{k}" for k in range(9)],
            }
        )
        return table, cols

    (t1, c1), (t2, c2) = make(1), make(2)
    table = multi_chunk_sliced(t1, t2)
    out = DefaultCollate()(table)
    for key in c1:
        expected = np.concatenate([c1[key], c2[key]])[3:13]
        np.testing.assert_array_equal(out[key].numpy(), expected)
    assert out["s"] == ([f"s1_{k}" for k in range(9)] + [f"s2_{k}" for k in range(9)])[3:13]


def test_plan_cache_follows_type_changes():
    collate = DefaultCollate()
    assert collate(pa.table({"x": np.arange(3, dtype=np.int32)}))["x"].dtype == torch.int32
    assert collate(pa.table({"x": np.arange(3.0)}))["x"].dtype == torch.float64
    img = collate(pa.table({"x": ray_tensor(np.ones((2, 4), np.uint8))}))["x"]
    assert img.shape == (2, 4) and img.dtype == torch.uint8
    with pytest.raises(ValueError, match="PadCollate"):
        collate(pa.table({"x": pa.array([[1], [2, 3]])}))
    with pytest.raises(ValueError, match="PadCollate"):  # errors are raised every time
        collate(pa.table({"x": pa.array([[1], [2, 3]])}))


def test_list_view_raises_with_cast_hint():
    column = pa.array([[1, 2], [3]], pa.list_view(pa.int32()))
    with pytest.raises(ValueError, match=r"column 'x'.*cast it to pyarrow.list_"):
        DefaultCollate()(pa.table({"x": column}))


# ---------------------------------------------------------------- DefaultCollate: memory


@pytest.mark.parametrize("sliced", [False, True])
def test_output_owns_its_memory(sliced):
    data = np.arange(9 * 3 * 4, dtype=np.float32).reshape(9, 3, 4)
    table = pa.table(
        {
            "x": np.arange(9, dtype=np.int64),
            "img": ray_tensor(data),
            "fsl": pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), 12),
            "b": np.arange(9) % 3 == 0,
        }
    )
    if sliced:
        table = multi_chunk_sliced(table)
    # combine_chunks copies, so `before` cannot alias what the collate output might.
    before = {
        name: pa.chunked_array([col.combine_chunks()])
        for name, col in zip(table.column_names, table.columns, strict=True)
    }
    out = DefaultCollate()(table)
    for tensor in out.values():
        assert_owned(tensor, table)
        tensor.add_(1) if tensor.dtype != torch.bool else tensor.logical_not_()
    for name, column in zip(table.column_names, table.columns, strict=True):
        assert column.equals(before[name]), f"mutating the batch changed Arrow column {name!r}"


def test_single_chunk_bool_is_not_copied_twice_but_owned():
    table = pa.table({"b": np.array([True, False, True])})
    out = DefaultCollate()(table)["b"]
    assert_owned(out, table)
    assert out.tolist() == [True, False, True]


def test_allocator_hook_receives_shape_and_dtype():
    calls, made = [], []

    def allocator(shape, dtype):
        calls.append((shape, dtype))
        made.append(torch.empty(shape, dtype=dtype))
        return made[-1]

    data = np.ones((4, 2, 3), dtype=np.uint8)
    table = pa.table(
        {"img": ray_tensor(data), "y": np.arange(4), "b": [True] * 4, "s": list("abcd")}
    )
    collate = DefaultCollate({"img": torch.float32}, allocator=allocator)
    out = collate(table)
    assert calls == [((4, 2, 3), torch.float32), ((4,), torch.int64), ((4,), torch.bool)]
    assert out["img"] is made[0] and out["y"] is made[1] and out["b"] is made[2]
    assert out["img"].sum().item() == 24.0 and out["b"].all()


def test_allocator_must_return_matching_tensor():
    table = pa.table({"y": np.arange(4)})
    with pytest.raises(ValueError, match="allocator"):
        DefaultCollate(allocator=lambda shape, dtype: torch.empty(3))(table)
    with pytest.raises(TypeError, match="allocator"):
        DefaultCollate(allocator="pinned")


# ---------------------------------------------------------------- DefaultCollate: dtypes


def test_single_dtype_applies_to_numeric_columns_only():
    table = pa.table(
        {
            "i": np.arange(3, dtype=np.int32),
            "f": np.arange(3, dtype=np.float64),
            "img": ray_tensor(np.ones((3, 2), np.uint8)),
            "b": [True, False, True],
            "ts": pa.array([0, 1, 2], pa.timestamp("s")),
        }
    )
    out = DefaultCollate(torch.float32)(table)
    assert [out[k].dtype for k in "i f img".split()] == [torch.float32] * 3
    assert out["b"].dtype == torch.bool and out["ts"].dtype == torch.int64
    assert out["i"].tolist() == [0.0, 1.0, 2.0]


def test_dict_dtypes_and_bfloat16():
    table = pa.table(
        {"i": np.arange(3, dtype=np.int32), "f": np.array([0.5, 1.5, 2.5]), "b": [True] * 3}
    )
    out = DefaultCollate({"f": torch.bfloat16, "b": torch.float16})(table)
    assert out["i"].dtype == torch.int32
    assert out["f"].dtype == torch.bfloat16 and out["f"].tolist() == [0.5, 1.5, 2.5]
    assert out["b"].dtype == torch.float16 and out["b"].tolist() == [1.0, 1.0, 1.0]
    sliced = multi_chunk_sliced(pa.table({"f": np.arange(9, dtype=np.float32)}))
    assert DefaultCollate(torch.bfloat16)(sliced)["f"].tolist() == [3, 4, 5, 6, 7, 8, 0, 1, 2, 3]


def immutable_copy(table: pa.Table) -> pa.Table:
    """`table` read back from IPC bytes: read-only buffers, like the object store's."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    frozen = pa.py_buffer(sink.getvalue().to_pybytes())
    out = pa.ipc.open_stream(frozen).read_all()
    assert not out.column(0).chunk(0).buffers()[1].is_mutable
    return out


def test_read_only_buffers_bfloat16_without_warnings(recwarn):
    table = immutable_copy(
        pa.table(
            {
                "f": np.array([0.5, 1.5, 2.5], np.float32),
                "l": pa.array([[1.0], [2.0, 3.0], []], pa.list_(pa.float32())),
            }
        )
    )
    out = DefaultCollate(torch.bfloat16)(table.select(["f"]))
    assert out["f"].dtype == torch.bfloat16 and out["f"].tolist() == [0.5, 1.5, 2.5]
    out = PadCollate(["l"], dtypes=torch.bfloat16)(table)
    assert out["l"].tolist() == [[1.0, 0.0], [2.0, 3.0], [0.0, 0.0]]
    empty = PadCollate(["l"], dtypes=torch.bfloat16)(table.slice(2, 1))
    assert empty["l"].shape == (1, 0)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_dtypes_unknown_column_raises_at_call():
    collate = DefaultCollate({"nope": torch.float32})
    with pytest.raises(ValueError, match=r"'nope'.*available columns: \['x', 'y'\]"):
        collate(pa.table({"x": [1], "y": [2]}))


def test_dtypes_on_string_column_raises():
    with pytest.raises(ValueError, match=r"dtypes\['s'\].*Python list"):
        DefaultCollate({"s": torch.float32})(pa.table({"s": ["a"]}))


@pytest.mark.parametrize(
    "bad", ["float32", np.float32, torch.complex64, {"x": "float32"}, {1: torch.float32}, [1]]
)
def test_dtypes_validated_at_construction(bad):
    with pytest.raises(TypeError, match="dtypes"):
        DefaultCollate(bad)


# ---------------------------------------------------------------- DefaultCollate: errors


def test_nulls_raise_naming_column_and_count():
    table = pa.table({"ok": [1, 2, 3], "x": pa.array([1.0, None, None])})
    with pytest.raises(ValueError, match=r"column 'x' has 2 null.*fill_null"):
        DefaultCollate()(table)
    with pytest.raises(ValueError, match="column 'b' has 1 null"):
        DefaultCollate()(pa.table({"b": [True, None]}))
    inner_null = pa.FixedSizeListArray.from_arrays(pa.array([1, None, 3, 4]), 2)
    with pytest.raises(ValueError, match="column 'v' has 1 null"):
        DefaultCollate()(pa.table({"v": inner_null}))
    data = np.ones((3, 2), np.float32)
    arr = ray_tensor(data)
    storage = pa.array([[1.0, 1.0], None, [1.0, 1.0]], arr.storage.type)
    null_row = pa.ExtensionArray.from_storage(arr.type, storage)
    with pytest.raises(ValueError, match="column 'img' has 1 null"):
        DefaultCollate()(pa.table({"img": null_row}))


@pytest.mark.parametrize(
    "column",
    [
        pa.array([[1, 2], [3]], pa.list_(pa.int32())),
        pa.array([[1, 2], [3]], pa.large_list(pa.int32())),
        ragged_tensor([np.zeros(2), np.zeros(3)]),
    ],
    ids=["list", "large_list", "ray_variable_1d"],
)
def test_variable_length_raises_pointing_to_padcollate(column):
    with pytest.raises(
        ValueError, match=r"column 'x'.*variable-length.*PadCollate\(columns=\['x'\]\)"
    ):
        DefaultCollate()(pa.table({"x": column}))


def test_variable_shaped_2d_tensor_raises():
    column = ragged_tensor([np.zeros((2, 2)), np.zeros((3, 2))])
    with pytest.raises(ValueError, match=r"column 'x'.*2-D tensors.*map_batches"):
        DefaultCollate()(pa.table({"x": column}))


@pytest.mark.parametrize(
    "column, type_text",
    [
        (pa.array([{"a": 1}, {"a": 2}]), "struct"),
        (pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64())), "map"),
        (pa.array([decimal.Decimal("1.5")]), "decimal"),
        (pa.array([None, None]), "null"),
        (
            pa.UnionArray.from_sparse(
                pa.array([0, 1], pa.int8()), [pa.array([1, 2]), pa.array(["a", "b"])]
            ),
            "union",
        ),
    ],
    ids=["struct", "map", "decimal", "null", "union"],
)
def test_unsupported_types_raise(column, type_text):
    with pytest.raises(ValueError, match=rf"column 'x' has Arrow type .*{type_text}"):
        DefaultCollate()(pa.table({"x": column}))


def test_not_a_table():
    with pytest.raises(TypeError, match="pyarrow.Table"):
        DefaultCollate()({"x": [1]})
    batch = pa.RecordBatch.from_pydict({"x": [1, 2]})
    assert DefaultCollate()(batch)["x"].tolist() == [1, 2]


def test_empty_table():
    table = pa.table(
        {
            "i": np.arange(4, dtype=np.int32),
            "b": [True] * 4,
            "img": ray_tensor(np.zeros((4, 3, 2), np.uint8)),
            "fsl": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8)), 2),
            "s": list("abcd"),
            "l": pa.array([[1]] * 4),
        }
    ).slice(2, 0)
    out = DefaultCollate()(table.drop_columns(["l"]))
    assert out["i"].shape == (0,) and out["i"].dtype == torch.int32
    assert out["b"].shape == (0,) and out["img"].shape == (0, 3, 2)
    assert out["fsl"].shape == (0, 2) and out["s"] == []
    padded = PadCollate(["l"])(table)
    assert padded["l"].shape == (0, 0) and padded["l_mask"].shape == (0, 0)


# ---------------------------------------------------------------- PadCollate


def reference_pad(rows, width, pad, keep=None):
    """Pure-Python padding: each row cut to `keep` items, then padded to `width`."""
    keep = width if keep is None else keep
    cut = [r[:keep] for r in rows]
    values = [[*r, *[pad] * (width - len(r))] for r in cut]
    mask = [[k < len(r) for k in range(width)] for r in cut]
    return values, mask


def random_rows(seed: int, n: int, max_len: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(1000) for _ in range(rnd.randrange(max_len + 1))] for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_pad_matches_reference(seed):
    rows = random_rows(seed, 40, 12)
    table = pa.table({"tok": pa.array(rows, pa.list_(pa.int32())), "y": np.arange(40)})
    out = PadCollate(["tok"], pad_value=-1)(table)
    width = max(map(len, rows))
    values, mask = reference_pad(rows, width, -1)
    assert out["tok"].dtype == torch.int32 and out["tok_mask"].dtype == torch.bool
    assert out["tok"].tolist() == values and out["tok_mask"].tolist() == mask
    assert out["y"].tolist() == list(range(40))
    assert list(out) == ["tok", "tok_mask", "y"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("list_type", [pa.list_, pa.large_list])
def test_pad_multi_chunk_sliced(seed, list_type):
    rows1, rows2 = random_rows(seed, 9, 7), random_rows(seed + 100, 9, 7)
    t1 = pa.table({"tok": pa.array(rows1, list_type(pa.int64()))})
    t2 = pa.table({"tok": pa.array(rows2, list_type(pa.int64()))})
    table = multi_chunk_sliced(t1, t2)
    assert table.column("tok").chunk(0).offsets[0].as_py() != 0  # really sliced
    rows = (rows1 + rows2)[3:13]
    out = PadCollate(["tok"])(table)
    values, mask = reference_pad(rows, max(map(len, rows)), 0)
    assert out["tok"].tolist() == values and out["tok_mask"].tolist() == mask
    assert_owned(out["tok"], table)


@pytest.mark.parametrize("seed", range(3))
def test_pad_truncation_and_multiple(seed):
    rows1, rows2 = random_rows(seed, 9, 15), random_rows(seed + 7, 9, 15)
    t1 = pa.table({"tok": pa.array(rows1, pa.list_(pa.int32()))})
    t2 = pa.table({"tok": pa.array(rows2, pa.list_(pa.int32()))})
    table = multi_chunk_sliced(t1, t2)
    rows = (rows1 + rows2)[3:13]
    longest = max(map(len, rows))
    for max_length, multiple in [(5, None), (None, 8), (5, 4), (100, 16), (1, None)]:
        out = PadCollate(["tok"], 7, max_length=max_length, pad_to_multiple_of=multiple)(table)
        width = longest if max_length is None else min(longest, max_length)
        if multiple:
            width = -(-width // multiple) * multiple
        values, mask = reference_pad(rows, width, 7, keep=max_length)
        assert out["tok"].shape == (10, width)
        assert out["tok"].tolist() == values and out["tok_mask"].tolist() == mask


def test_pad_rounding_past_max_length_fills_padding():
    """Every row longer than max_length, L rounded up past it: the tail must be padding."""

    def dirty(shape, dtype):  # stale staging memory
        return (
            torch.full(shape, 99, dtype=dtype)
            if dtype != torch.bool
            else torch.ones(shape, dtype=dtype)
        )

    table = pa.table({"x": pa.array([list(range(6)), list(range(10, 16))])})
    out = PadCollate(["x"], pad_value=-1, max_length=2, pad_to_multiple_of=4, allocator=dirty)(
        table
    )
    assert out["x"].tolist() == [[0, 1, -1, -1], [10, 11, -1, -1]]
    assert out["x_mask"].tolist() == [[True, True, False, False]] * 2


def test_pad_value_dict_and_dtypes():
    table = pa.table(
        {
            "a": pa.array([[1], [2, 3]], pa.list_(pa.int64())),
            "b": pa.array([[0.5, 1.5], []], pa.list_(pa.float32())),
            "c": pa.array([[1], []], pa.list_(pa.uint8())),
        }
    )
    out = PadCollate(["a", "b", "c"], pad_value={"a": -100, "b": 9.5}, dtypes={"a": torch.float32})(
        table
    )
    assert out["a"].dtype == torch.float32 and out["a"].tolist() == [[1, -100], [2, 3]]
    assert out["b"].dtype == torch.float32 and out["b"].tolist() == [[0.5, 1.5], [9.5, 9.5]]
    assert out["c"].tolist() == [[1], [0]]
    out = PadCollate(["b"], dtypes=torch.bfloat16)(table.select(["b"]))
    assert out["b"].dtype == torch.bfloat16 and out["b"].tolist() == [[0.5, 1.5], [0, 0]]


def test_pad_fixed_size_items_fixed_size_list_and_ray_variable():
    points = pa.array([[[1, 2, 3]], [[4, 5, 6], [7, 8, 9]]], pa.list_(pa.list_(pa.float32(), 3)))
    fsl = pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4], pa.int16()), 2)
    ragged = ragged_tensor([np.array([1, 2, 3]), np.array([4])])
    table = pa.table({"pts": points, "fsl": fsl, "rt": ragged})
    out = PadCollate(["pts", "fsl", "rt"])(table)
    assert out["pts"].shape == (2, 2, 3)
    assert out["pts"].tolist() == [[[1, 2, 3], [0, 0, 0]], [[4, 5, 6], [7, 8, 9]]]
    assert out["pts_mask"].tolist() == [[True, False], [True, True]]
    assert out["fsl"].tolist() == [[1, 2], [3, 4]] and out["fsl_mask"].all()
    assert out["fsl"].dtype == torch.int16
    assert out["rt"].tolist() == [[1, 2, 3], [4, 0, 0]]
    out = PadCollate(["fsl"], max_length=1, pad_to_multiple_of=4)(table.select(["fsl"]).slice(1))
    assert out["fsl"].tolist() == [[3, 0, 0, 0]]
    assert out["fsl_mask"].tolist() == [[True, False, False, False]]


def test_pad_ray_variable_tensor_multi_chunk_sliced():
    rnd = random.Random(3)
    rows = [np.arange(rnd.randrange(1, 6), dtype=np.float32) + 10 * k for k in range(18)]
    t1 = pa.table({"rt": ragged_tensor(rows[:9])})
    t2 = pa.table({"rt": ragged_tensor(rows[9:])})
    out = PadCollate(["rt"], pad_value=-1.0)(multi_chunk_sliced(t1, t2))
    expected_rows = [r.tolist() for r in rows[3:13]]
    values, mask = reference_pad(expected_rows, max(map(len, expected_rows)), -1.0)
    assert out["rt"].dtype == torch.float32
    assert out["rt"].tolist() == values and out["rt_mask"].tolist() == mask


def test_pad_bool_and_timestamp_items():
    table = pa.table(
        {
            "flags": pa.array([[True, False, True], [False]]),
            "times": pa.array([[1, 2], [3]], pa.list_(pa.timestamp("ms"))),
        }
    )
    out = PadCollate(["flags", "times"])(table.slice(1, 0))
    assert out["flags"].shape == (0, 0) and out["times"].dtype == torch.int64
    out = PadCollate(["flags", "times"])(pa.concat_tables([table, table]).slice(1, 2))
    assert out["flags"].dtype == torch.bool
    assert out["flags"].tolist() == [[False, False, False], [True, False, True]]
    assert out["times"].dtype == torch.int64 and out["times"].tolist() == [[3, 0], [1, 2]]


def test_pad_all_rows_empty():
    out = PadCollate(["x"])(pa.table({"x": pa.array([[], []], pa.list_(pa.int8()))}))
    assert out["x"].shape == (2, 0) and out["x_mask"].shape == (2, 0)
    out = PadCollate(["x"], pad_to_multiple_of=4)(pa.table({"x": pa.array([[], [1]])}))
    assert out["x"].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]


def test_pad_allocator_and_ownership():
    calls = []

    def allocator(shape, dtype):
        calls.append((shape, dtype))
        return torch.empty(shape, dtype=dtype)

    table = pa.table({"x": pa.array([[1, 2], [3]]), "y": [1, 2]})
    out = PadCollate(["x"], allocator=allocator)(table)
    assert calls == [((2, 2), torch.int64), ((2, 2), torch.bool), ((2,), torch.int64)]
    out["x"].add_(10)
    assert table.column("x").to_pylist() == [[1, 2], [3]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"columns": "x"}, r"columns='x' is a single string.*\['x'\]"),
        ({"columns": []}, "non-empty"),
        ({"columns": ["x", 1]}, "non-string"),
        ({"columns": ["x", "x"]}, "twice"),
        ({"columns": ["x"], "max_length": 0}, "max_length=0"),
        ({"columns": ["x"], "max_length": 2.5}, "max_length=2.5"),
        ({"columns": ["x"], "max_length": True}, "max_length=True"),
        ({"columns": ["x"], "pad_to_multiple_of": 0}, "pad_to_multiple_of=0"),
        ({"columns": ["x"], "pad_value": "0"}, "pad_value='0'"),
        ({"columns": ["x"], "pad_value": {"y": 0}}, r"pad_value names column.*\['y'\]"),
    ],
)
def test_pad_validation_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PadCollate(**kwargs)


def test_pad_errors_at_call():
    table = pa.table(
        {
            "x": pa.array([[1], [2, 3]]),
            "n": [1, 2],
            "s": pa.array([["a"], ["b"]]),
            "nn": pa.array([[[1]], [[2, 3]]]),
            "nullrow": pa.array([[1], None]),
            "nullitem": pa.array([[1, None], [2]]),
            "u": pa.array([[1], [2]], pa.list_(pa.uint8())),
        }
    )
    with pytest.raises(ValueError, match=r"\['missing'\].*available columns"):
        PadCollate(["missing"])(table)
    with pytest.raises(ValueError, match=r"column 'n' \(type int64\) is not a list column"):
        PadCollate(["n"])(table.select(["n"]))
    with pytest.raises(ValueError, match="column 's'.*string items"):
        PadCollate(["s"])(table.select(["s"]))
    with pytest.raises(ValueError, match="column 'nn'.*one level"):
        PadCollate(["nn"])(table.select(["nn"]))
    with pytest.raises(ValueError, match="column 'nullrow' has 1 null"):
        PadCollate(["nullrow"])(table.select(["nullrow"]))
    with pytest.raises(ValueError, match="column 'nullitem' has 1 null"):
        PadCollate(["nullitem"])(table.select(["nullitem"]))
    with pytest.raises(ValueError, match=r"pad_value=-1 for column 'u'.*uint8"):
        PadCollate(["u"], pad_value=-1)(table.select(["u"]))
    with pytest.raises(ValueError, match=r"pad_value=0.5 for column 'x'"):
        PadCollate(["x"], pad_value=0.5)(table.select(["x"]))
    with pytest.raises(ValueError, match="column 'x'.*PadCollate"):  # unlisted ragged column
        PadCollate(["u"])(table.select(["x", "u"]))
    clash = pa.table({"x": pa.array([[1]]), "x_mask": [True]})
    with pytest.raises(ValueError, match=r"\['x_mask'\]"):
        PadCollate(["x"])(clash)
