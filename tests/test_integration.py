"""RayIterableDataset on a small local Ray: every row once, order, DataLoader, types."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

import torch_raydata as trd

pytestmark = pytest.mark.usefixtures("ray_session")


def _ds(n=2000, blocks=7):
    import ray

    return ray.data.range(n, override_num_blocks=blocks).map_batches(
        lambda b: {"id": b["id"], "x": (b["id"] * 2).astype(np.float32)}
    )


@pytest.mark.parametrize("shuffle", [None, 300])
def test_every_row_exactly_once_per_epoch_for_two_epochs(shuffle):
    ds = trd.RayIterableDataset(
        _ds(), batch_size=64, shuffle_buffer_size=shuffle, shuffle_seed=1, num_workers=3
    )
    orders = []
    for _epoch in range(2):
        ids = []
        for b in DataLoader(ds, batch_size=None):
            assert torch.equal(b["x"], (b["id"] * 2).float())
            ids.append(b["id"].numpy())
        ids = np.concatenate(ids)
        assert len(ids) == 2000 and len(np.unique(ids)) == 2000
        orders.append(ids)
    st = ds.stats()
    assert st.epoch == 1 and st.rows == 2000 and st.batches == 32
    if shuffle:
        assert not np.array_equal(orders[0], orders[1])


def test_preserve_order_gives_dataset_order():
    ds = trd.RayIterableDataset(_ds(), batch_size=50, preserve_order=True, num_workers=4)
    ids = np.concatenate([b["id"].numpy() for b in ds])
    assert np.array_equal(ids, np.arange(2000))


def test_len_known_and_unknown():
    import ray

    assert len(trd.RayIterableDataset(ray.data.range(1001), batch_size=100)) == 11
    assert len(trd.RayIterableDataset(ray.data.range(1001), batch_size=100, drop_last=True)) == 10
    with pytest.raises(TypeError, match="not known without executing"):
        len(trd.RayIterableDataset(ray.data.range(10).filter(lambda r: True)))


def test_dataloader_with_worker_processes_gives_a_clear_error():
    import ray

    loader = DataLoader(trd.RayIterableDataset(ray.data.range(10)), batch_size=None, num_workers=1)
    it = iter(loader)
    try:
        with pytest.raises(RuntimeError, match=r"num_workers=0"):
            next(it)
    finally:
        it._shutdown_workers()  # joins DataLoader's own feeder thread


def test_data_iterator_input():
    import ray

    it = ray.data.range(500).iterator()
    ids = np.concatenate([b["id"].numpy() for b in trd.RayIterableDataset(it, batch_size=64)])
    assert sorted(ids.tolist()) == list(range(500))


def test_collate_of_each_column_type_through_ray():
    import ray

    n = 40
    table = pa.table(
        {
            "i8": pa.array(np.arange(n, dtype=np.int8)),
            "u8": pa.array(np.arange(n, dtype=np.uint8)),
            "f16": pa.array(np.arange(n, dtype=np.float16)),
            "f64": pa.array(np.arange(n, dtype=np.float64)),
            "flag": pa.array(np.arange(n) % 2 == 0),
            "ts": pa.array(np.arange(n).astype("datetime64[ms]")),
            "name": pa.array([f"row{i}" for i in range(n)]),
            "vec": pa.FixedSizeListArray.from_arrays(
                pa.array(np.arange(n * 3, dtype=np.float32)), 3
            ),
        }
    )
    ds = ray.data.from_arrow(table)
    batches = list(trd.RayIterableDataset(ds, batch_size=16, preserve_order=True))
    b = batches[0]
    assert b["i8"].dtype == torch.int8 and b["u8"].dtype == torch.uint8
    assert b["f16"].dtype == torch.float16 and b["f64"].dtype == torch.float64
    assert b["flag"].dtype == torch.bool and b["flag"][:2].tolist() == [True, False]
    assert b["ts"].dtype == torch.int64
    assert b["name"][:2] == ["row0", "row1"]
    assert b["vec"].shape == (16, 3) and b["vec"][1].tolist() == [3.0, 4.0, 5.0]
    assert sum(x["i8"].shape[0] for x in batches) == n


def test_ray_tensor_column_and_in_place_safety():
    import ray

    arr = np.arange(64 * 3 * 4 * 4, dtype=np.uint8).reshape(64, 3, 4, 4)
    ds = ray.data.from_numpy(arr).materialize()
    loader = trd.RayIterableDataset(ds, batch_size=16, preserve_order=True)
    for b in loader:
        assert b["data"].shape == (16, 3, 4, 4)
        b["data"].zero_()  # the training step writes into its batch...
    again = torch.cat([b["data"] for b in loader]).numpy()
    assert np.array_equal(again, arr)  # ...and the object store copy is untouched


def test_break_releases_everything_and_next_epoch_works():
    import threading

    ds = trd.RayIterableDataset(_ds(5000, 20), batch_size=10, num_workers=2)
    for i, _ in enumerate(ds):
        if i == 3:
            break
    ds.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("trd-")]
    assert sum(b["id"].shape[0] for b in ds) == 5000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": -3}, "batch_size=-3"),
        ({"num_workers": 0}, "num_workers=0"),
        ({"prefetch_batches": 0}, "prefetch_batches=0"),
        ({"shuffle_buffer_size": 0}, "shuffle_buffer_size=0"),
        ({"collate_fn": 3}, "collate_fn=3"),
        ({"id_column": "nope"}, "id_column='nope'"),
        ({"transport": "warp"}, "transport='warp'"),
        ({"device": "cuda"}, "CUDA is not available"),
        ({"device": "tpu9"}, "device='tpu9'"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    import ray

    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match=match):
        trd.RayIterableDataset(ray.data.range(10), **kwargs)


def test_not_a_dataset_is_a_type_error():
    with pytest.raises(TypeError, match="ray.data.Dataset"):
        trd.RayIterableDataset(i for i in range(3))
    with pytest.raises(TypeError, match="ray.data.Dataset"):
        trd.RayIterableDataset([{"a": 1}])


def test_state_dict_round_trip_skip_ahead():
    import ray

    ds = trd.RayIterableDataset(ray.data.range(100), batch_size=10, preserve_order=True)
    it = iter(ds)
    for _ in range(3):
        next(it)
    sd = ds.state_dict()
    assert sd["epoch"] == 0 and sd["batches_consumed"] == 3 and sd["exact"] is False
    it.close()
    fresh = trd.RayIterableDataset(ray.data.range(100), batch_size=10, preserve_order=True)
    fresh.load_state_dict(sd)
    ids = np.concatenate([b["id"].numpy() for b in fresh])
    assert ids.tolist() == list(range(30, 100))
    assert fresh.state_dict()["epoch"] == 1
    with pytest.raises(ValueError, match="batch_size"):
        trd.RayIterableDataset(ray.data.range(100), batch_size=7).load_state_dict(sd)
    with pytest.raises(ValueError, match="not a RayIterableDataset state"):
        fresh.load_state_dict({"foo": 1})
