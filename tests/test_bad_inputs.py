"""A catalogue of bad inputs: each gives a clear error naming the value and the fix, raised
as early as it can be (at construction when the schema or value allows), with no hang and
no partial batch delivered as if whole. Plus the edge cases that are NOT errors (empty
dataset, batch larger than the dataset), with the behaviour chosen for them.

    construction  RayIterableDataset(...) options, inputs, devices, collate settings
    consumption   data the collate or the IDs cannot take (types, nulls, ragged, dupes)
    state         load_state_dict of something that is not our state
    edge cases    0 rows, batch_size > rows
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import torch_raydata as trd
from torch_raydata.collate import DefaultCollate, PadCollate
from torch_raydata.transports import LocalTransport

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(60)]


def _range(n=10):
    import ray

    return ray.data.range(n)


def _arrow(**columns):
    import pyarrow as pa
    import ray

    return ray.data.from_arrow(pa.table(columns))


def _gen():
    return (i for i in range(3))


def _tensor_dataset():
    return torch.utils.data.TensorDataset(torch.zeros(3))


def _pandas():
    import pandas as pd

    return pd.DataFrame({"a": [1, 2]})


# -- construction: (id, dataset factory, options, exception, message regex) -----------------
CONSTRUCTION = [
    ("batch_size=0", _range, {"batch_size": 0}, ValueError, r"batch_size=0 must be an int >= 1"),
    ("batch_size<0", _range, {"batch_size": -5}, ValueError, r"batch_size=-5 must be"),
    ("batch_size float", _range, {"batch_size": 2.5}, ValueError, r"batch_size=2.5 must be an int"),
    ("batch_size str", _range, {"batch_size": "32"}, ValueError, r"batch_size='32' must be an int"),
    ("batch_size bool", _range, {"batch_size": True}, ValueError, r"batch_size=True must be an int"),
    ("num_workers=0", _range, {"num_workers": 0}, ValueError, r"num_workers=0 must be an int >= 1"),
    ("num_workers 1.5", _range, {"num_workers": 1.5}, ValueError, r"num_workers=1.5 must be an int >= 1 or None"),
    ("prefetch<0", _range, {"prefetch_batches": -1}, ValueError, r"prefetch_batches=-1 must be"),
    ("shuffle_buffer=0", _range, {"shuffle_buffer_size": 0}, ValueError, r"shuffle_buffer_size=0"),
    ("shuffle_buffer float", _range, {"shuffle_buffer_size": 1.5}, ValueError, r"shuffle_buffer_size=1.5"),
    ("shuffle_seed<0", _range, {"shuffle_seed": -1}, ValueError, r"shuffle_seed=-1 must be an int >= 0"),
    ("shuffle_seed str", _range, {"shuffle_seed": "s"}, ValueError, r"shuffle_seed='s' must be"),
    ("num_rows<0", _range, {"num_rows": -5}, ValueError, r"num_rows=-5 must be an int >= 0"),
    ("num_rows str", _range, {"num_rows": "5"}, ValueError, r"num_rows='5' must be"),
    ("preserve_order str", _range, {"preserve_order": "no"}, ValueError, r"preserve_order='no' must be True or False"),
    ("drop_last None", _range, {"drop_last": None}, ValueError, r"drop_last=None must be True or False"),
    ("progress str", _range, {"progress": "yes"}, ValueError, r"progress='yes' must be True, False or a dict"),
    ("collate_fn int", _range, {"collate_fn": 42}, ValueError, r"collate_fn=42 must be callable"),
    ("collate_fn str", _range, {"collate_fn": "default"}, ValueError, r"collate_fn='default' must be callable"),
    ("id_column int", _range, {"id_column": 3}, ValueError, r"id_column=3 must be a column name"),
    ("id_column unknown", _range, {"id_column": "nope"}, ValueError, r"id_column='nope' is not a column.*\['id'\]"),
    ("transport unknown", _range, {"transport": "warp"}, ValueError, r"transport='warp' is unknown; use 'auto'"),
    ("transport int", _range, {"transport": 42}, ValueError, r"transport=42 must be 'auto'"),
    ("transport/device mismatch", _range, {"transport": LocalTransport(), "device": "meta"}, ValueError, r"moves batches to cpu, but device='meta'"),
    ("device tpu9", _range, {"device": "tpu9"}, ValueError, r"device='tpu9' is not a device: use None, 'cpu'"),
    ("device gpu", _range, {"device": "gpu"}, ValueError, r"device='gpu' is not a device"),
    ("device empty", _range, {"device": ""}, ValueError, r"device='' is not a device"),
    ("device cuda:x", _range, {"device": "cuda:x"}, ValueError, r"device='cuda:x' is not a device"),
    ("device float", _range, {"device": 3.5}, ValueError, r"device=3.5 is not a device"),
    ("device meta", _range, {"device": "meta"}, ValueError, r"device='meta'.*'cpu' or 'cuda' devices only.*Transport"),
    ("device cuda, no CUDA", _range, {"device": "cuda"}, ValueError, r"CUDA is not available.*device=None"),
    ("dtypes unknown column", _range, {"collate_fn": DefaultCollate({"nope": torch.float32})}, ValueError, r"dtypes names column\(s\) \['nope'\].*\['id'\]"),
    ("PadCollate unknown column", _range, {"collate_fn": PadCollate(["tokens"])}, ValueError, r"PadCollate columns \['tokens'\] are not in the table.*\['id'\]"),
    ("PadCollate mask name taken", lambda: _arrow(a=_pa().array([[1], [2]]), a_mask=_pa().array([1, 2])), {"collate_fn": PadCollate(["a"])}, ValueError, r"already has column\(s\) \['a_mask'\], which PadCollate would overwrite"),
    ("generator", _gen, {}, TypeError, r"expected a ray.data.Dataset or ray.data.DataIterator, got builtins.generator"),
    ("list", lambda: [{"a": 1}], {}, TypeError, r"got builtins.list; build one with ray.data.from_items"),
    ("torch Dataset", _tensor_dataset, {}, TypeError, r"got torch.utils.data.dataset.TensorDataset"),
    ("None", lambda: None, {}, TypeError, r"got builtins.NoneType"),
    ("pandas", _pandas, {}, TypeError, r"got pandas.*DataFrame"),
]


@pytest.mark.parametrize(
    "factory, options, exc, match", [c[1:] for c in CONSTRUCTION], ids=[c[0] for c in CONSTRUCTION]
)
def test_bad_option_or_input_fails_at_construction(factory, options, exc, match):
    if options.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(exc, match=match):
        trd.RayIterableDataset(factory(), **options)


COLLATE_CONSTRUCTION = [
    ("dtypes str", lambda: DefaultCollate("float32"), TypeError, r"dtypes='float32' must be None, a torch.dtype, or a dict"),
    ("dtypes value str", lambda: DefaultCollate({"x": "float32"}), TypeError, r"dtypes\['x'\]='float32' is not a supported"),
    ("dtypes key int", lambda: DefaultCollate({1: torch.float32}), TypeError, r"dtypes key 1 must be a column name"),
    ("dtypes complex", lambda: DefaultCollate(torch.complex64), TypeError, r"torch.complex64 is not a supported"),
    ("PadCollate str", lambda: PadCollate("tokens"), ValueError, r"columns='tokens' is a single string: pass a list, \['tokens'\]"),
    ("PadCollate empty", lambda: PadCollate([]), ValueError, r"columns=\[\] must be a non-empty list"),
    ("PadCollate twice", lambda: PadCollate(["a", "a"]), ValueError, r"lists a column twice"),
    ("PadCollate max_length=0", lambda: PadCollate(["a"], max_length=0), ValueError, r"max_length=0 must be an int >= 1"),
    ("PadCollate pad str", lambda: PadCollate(["a"], pad_value="x"), ValueError, r"pad_value='x' must be a real number"),
    ("iter_threaded workers=0", lambda: trd.iter_threaded(range(3), str, num_workers=0, output_buffer_size=2), ValueError, r"num_workers=0 must be an int >= 1"),
    ("iter_threaded buffer=0", lambda: trd.iter_threaded(range(3), str, num_workers=1, output_buffer_size=0), ValueError, r"output_buffer_size=0 must be an int >= 1"),
    ("iter_threaded workers=True", lambda: trd.iter_threaded(range(3), str, num_workers=True, output_buffer_size=2), ValueError, r"num_workers=True must be an int >= 1"),
    ("PadCollate max_length=True", lambda: PadCollate(["a"], max_length=True), ValueError, r"max_length=True must be an int >= 1 or None"),
    ("set_epoch<0", lambda: trd.RayIterableDataset(_range()).set_epoch(-1), ValueError, r"epoch=-1 must be an int >= 0"),
    ("set_epoch str", lambda: trd.RayIterableDataset(_range()).set_epoch("1"), ValueError, r"epoch='1' must be an int"),
]


def test_int_options_accept_numpy_integers_and_refuse_bools():
    from torch_raydata._checks import check_bool, check_int

    value = check_int("batch_size", np.int64(32), 1)
    assert value == 32 and type(value) is int
    assert check_int("shuffle_seed", None, 0, allow_none=True) is None
    for bad in (True, np.bool_(False), 2.0, "2"):
        with pytest.raises(ValueError, match=r"batch_size=.* must be an int >= 1"):
            check_int("batch_size", bad, 1)
    assert check_bool("drop_last", np.bool_(True)) is True
    with pytest.raises(ValueError, match=r"drop_last=1 must be True or False"):
        check_bool("drop_last", 1)
    assert PadCollate(["a"], max_length=np.int32(8)).max_length == 8
    it = trd.iter_threaded(range(3), str, num_workers=np.int64(2), output_buffer_size=np.int8(2))
    assert sorted(it) == ["0", "1", "2"]


@pytest.mark.parametrize(
    "make, exc, match", [c[1:] for c in COLLATE_CONSTRUCTION], ids=[c[0] for c in COLLATE_CONSTRUCTION]
)
def test_bad_collate_or_helper_argument_fails_when_made(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# -- consumption: (id, dataset factory, options, exception, regex, whole batches first) -----
def _nulls_in_third_block():
    import pyarrow as pa
    import ray

    blocks = [pa.table({"a": pa.array([1.0] * 8)}), pa.table({"a": pa.array([2.0] * 8)})]
    blocks.append(pa.table({"a": pa.array([3.0, None] * 4)}))
    return ray.data.from_arrow(blocks)


def _pa():
    import pyarrow as pa

    return pa


CONSUMPTION = [
    ("ragged list, no PadCollate", lambda: _arrow(tokens=_pa().array([[1, 2], [3]] * 4)), {}, ValueError, r"column 'tokens' \(type list<item: int64>\) is variable-length: use trd.collate.PadCollate\(columns=\['tokens'\]\)", 0),
    ("nulls in a numeric column", lambda: _arrow(a=_pa().array([1, None, 3, 4])), {}, ValueError, r"column 'a' has 1 null value\(s\).*fill_null", 0),
    ("nulls only in a later block", _nulls_in_third_block, {"batch_size": 8, "preserve_order": True}, ValueError, r"column 'a' has 4 null value\(s\)", 2),
    ("string where a number is expected", lambda: _arrow(s=_pa().array(["1.5", "2"])), {"collate_fn": DefaultCollate({"s": torch.float32})}, ValueError, r"dtypes\['s'\] is set but column 's' \(type string\) becomes a Python list"),
    ("struct column", lambda: _arrow(s=_pa().array([{"x": 1}, {"x": 2}])), {}, ValueError, r"column 's' has Arrow type struct<x: int64>, which has no tensor form: flatten it"),
    ("decimal column", lambda: _arrow(d=_pa().array([__import__("decimal").Decimal("1.5")])), {}, ValueError, r"column 'd' has Arrow type decimal.*cast it to float64"),
    ("map column", lambda: _arrow(m=_pa().array([[("k", 1)]], type=_pa().map_(_pa().string(), _pa().int64()))), {}, ValueError, r"column 'm' has Arrow type map<string, int64>.*drop_columns\(\['m'\]\)"),
    ("null-typed column", lambda: _arrow(n=_pa().array([None, None])), {}, ValueError, r"column 'n' has Arrow type null"),
    ("PadCollate over a non-list", lambda: _arrow(a=_pa().array([1, 2])), {"collate_fn": PadCollate(["a"])}, ValueError, r"column 'a' \(type int64\) is not a list column.*remove 'a'"),
    ("dtypes unknown column, schema unknown", lambda: _range().map_batches(lambda b: b), {"collate_fn": DefaultCollate({"nope": torch.float32})}, ValueError, r"dtypes names column\(s\) \['nope'\] not in the table"),
    ("float id_column", lambda: _arrow(f=_pa().array([1.5, 2.5])), {"id_column": "f"}, ValueError, r"id_column has Arrow type double; it must be an integer or string column"),
    ("id_column with nulls", lambda: _arrow(i=_pa().array([1, None])), {"id_column": "i"}, ValueError, r"id_column 'i' has 1 null values"),
    ("collate_fn returns None", _range, {"collate_fn": lambda t: None}, TypeError, r"collate_fn .* returned None for batch 0; it must return the collated batch"),
    ("collate_fn of no argument", _range, {"collate_fn": lambda: {}}, TypeError, r"takes 0 positional arguments"),
]


@pytest.mark.parametrize(
    "factory, options, exc, match, whole_before",
    [(*c[1:5], c[5] if len(c) > 5 else 0) for c in CONSUMPTION],
    ids=[c[0] for c in CONSUMPTION],
)
def test_bad_data_fails_at_the_batch_with_a_clear_error(factory, options, exc, match, whole_before):
    ds = trd.RayIterableDataset(factory(), **({"batch_size": 4, "num_workers": 2} | options))
    got = []
    with pytest.raises(exc, match=match) as ei:
        for b in DataLoader(ds, batch_size=None):
            got.append(b)
    # The stage (and the batch) that failed travel with the error.
    assert any("[torch_raydata] raised in stage" in n for n in ei.value.__notes__)
    # Batches before the failing one are whole; nothing after it is delivered.
    assert len(got) == whole_before
    assert all(len(next(iter(b.values()))) == ds.config.batch_size for b in got)
    assert ds.stats().buffered_batches == 0


def test_duplicate_ids_are_refused_before_a_silently_wrong_resume():
    """Decision: detected when the state is taken (state_dict), where the consumed-ID set
    would collapse the repeats and a resume would skip rows never trained on."""
    ds = trd.RayIterableDataset(
        _arrow(i=_pa().array([1, 1, 2, 3])), batch_size=2, id_column="i", preserve_order=True
    )
    it = iter(ds)
    next(it)
    with pytest.raises(ValueError, match=r"id_column='i' is not unique: the 2 rows yielded this epoch carry 1 distinct IDs"):
        ds.state_dict()
    it.close()


def test_dataloader_with_worker_processes_is_refused_on_the_first_batch():
    loader = DataLoader(trd.RayIterableDataset(_range()), batch_size=None, num_workers=1)
    it = iter(loader)
    try:
        with pytest.raises(RuntimeError, match=r"DataLoader worker process.*num_workers=0"):
            next(it)
    finally:
        it._shutdown_workers()


# -- state that is not ours -----------------------------------------------------------------
def _state(**overrides):
    ds = trd.RayIterableDataset(_range(100), batch_size=10)
    return ds.state_dict() | overrides


def _exact_state():
    return trd.RayIterableDataset(_range(100), batch_size=10, id_column="id").state_dict()


STATES = [
    ("not a dict", lambda: [1], {}, r"not a RayIterableDataset state \(version 2 expected\)"),
    ("wrong version", lambda: _state(version=99), {}, r"not a RayIterableDataset state"),
    ("missing keys", lambda: {"version": 2, "epoch": 0}, {}, r"loader state is missing \['batch_size', 'batches_consumed'\]"),
    ("epoch not an int", lambda: _state(epoch="x"), {}, r"loader state has epoch='x', not an int >= 0"),
    ("negative batches", lambda: _state(batches_consumed=-1), {}, r"batches_consumed=-1, not an int >= 0"),
    ("another batch size", _state, {"batch_size": 7}, r"saved with batch_size=10, this loader has batch_size=7.*strict=False"),
    ("exact state, no id_column", lambda: _exact_state(), {}, r"loader state is exact \(saved with id_column='id'\)"),
    ("ID-less state, id_column", _state, {"id_column": "id"}, r"saved with id_column=None, this loader has id_column='id'|no consumed-ID set"),
    ("corrupt consumed set", lambda: _exact_state() | {"consumed": {"format": "roaring64", "bytes": b"", "count": 3}}, {"id_column": "id"}, r"consumed-ID set|deserializ|Invalid|corrupt"),
]


@pytest.mark.parametrize("make, options, match", [s[1:] for s in STATES], ids=[s[0] for s in STATES])
def test_a_state_that_is_not_ours_is_refused(make, options, match):
    state = make()
    loader = trd.RayIterableDataset(_range(100), **({"batch_size": 10} | options))
    with pytest.raises(ValueError, match=match):
        loader.load_state_dict(state)


# -- edge cases that are not errors ----------------------------------------------------------
@pytest.mark.parametrize(
    "make, known",
    [
        (lambda: _range(0), True),
        (lambda: __import__("ray").data.from_items([]), True),
        (lambda: _range(50).map_batches(lambda b: {"id": b["id"][:0]}), False),
    ],
    ids=["range(0)", "from_items([])", "all rows filtered out"],
)
@pytest.mark.parametrize("shuffle", [None, 8])
def test_empty_dataset_is_an_epoch_of_zero_batches(make, known, shuffle):
    """Decision: 0 rows -> every epoch yields 0 batches (no hang, no error); len() == 0 when
    the row count is known without executing."""
    ds = trd.RayIterableDataset(make(), batch_size=4, shuffle_buffer_size=shuffle, shuffle_seed=0)
    if known:
        assert len(ds) == 0
    for _ in range(2):
        assert list(DataLoader(ds, batch_size=None)) == []
    assert ds.stats().batches == 0 and ds.stats().rows == 0


def test_batch_size_larger_than_the_dataset():
    ds = trd.RayIterableDataset(_range(10), batch_size=100)
    assert len(ds) == 1
    (only,) = list(ds)
    assert sorted(only["id"].tolist()) == list(range(10))  # no order without preserve_order
    dropped = trd.RayIterableDataset(_range(10), batch_size=100, drop_last=True)
    assert len(dropped) == 0 and list(dropped) == []
    assert dropped.stats().rows_dropped == 10
