"""``trd.iter_torch_batches``: Ray 2.60's own test cases for ``iter_torch_batches``, restated.

Restated in our words from ray-project/ray ``python/ray/data/tests/test_torch_iter_batches.py``
(multi-block pandas data, tensor data, the Ray Train shard case with 2 workers) and the
torch parts of ``test_iterator.py`` (conversion, re-use, preemption, ``collate_fn`` and
its ``dtypes``/``device`` rules, null-type columns, threaded default collate), then our
own: the three collate base classes, ``dtypes`` naming some columns, the inputs Ray
accepts, and what we refuse up front. Runs on the session's local Ray.
"""

from __future__ import annotations

from unittest.mock import patch

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

import torch_raydata as trd

pytestmark = pytest.mark.usefixtures("ray_session")


def _ray():
    import ray

    return ray


# -- test_torch_iter_batches.py ------------------------------------------------------------------
def test_multi_block_frames_every_row_each_epoch():
    ray = _ray()
    frames = [
        pd.DataFrame({"one": [1, 2, 3], "two": [1.0, 2.0, 3.0], "label": [1.0, 2.0, 3.0]}),
        pd.DataFrame({"one": [4, 5, 6], "two": [4.0, 5.0, 6.0], "label": [4.0, 5.0, 6.0]}),
        pd.DataFrame({"one": [7, 8], "two": [7.0, 8.0], "label": [7.0, 8.0]}),
    ]
    expected = pd.concat(frames).values
    batches = trd.iter_torch_batches(ray.data.from_pandas(frames), batch_size=3)
    for _epoch in range(2):
        got = np.concatenate(
            [torch.stack((b["one"], b["two"], b["label"]), dim=1).numpy() for b in batches]
        )
        np.testing.assert_array_equal(np.sort(expected, axis=0), np.sort(got, axis=0))


def test_tensor_column_in_order_each_epoch():
    ray = _ray()
    first, second = np.arange(12).reshape((3, 2, 2)), np.arange(12, 24).reshape((3, 2, 2))
    batches = trd.iter_torch_batches(ray.data.from_numpy([first, second]), batch_size=2)
    for _epoch in range(2):
        got = [b["data"] for b in batches]
        assert all(t.shape[1:] == (2, 2) for t in got)
        np.testing.assert_array_equal(np.concatenate([first, second]), torch.cat(got).numpy())


def _ray_train_loop() -> None:
    """On each Ray Train worker: two epochs over its shard through trd.iter_torch_batches."""
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device

    import torch_raydata as trd
    from torch_raydata.pipeline.source import ray_train_device

    batches = trd.iter_torch_batches(ray.train.get_dataset_shard("train"), batch_size=16)
    rows, devices = [], set()
    for _epoch in range(2):
        n = 0
        for batch in batches:
            n += len(batch["data"])
            devices.add(str(batch["data"].device))
        rows.append(n)
    batches.close()
    mine = {
        "rows": rows,
        "devices": sorted(devices),
        "train_device": str(get_device()),
        "in_worker": ray_train_device() is not None,
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    # Ray Train (V2) keeps the metrics reported with a checkpoint: rank 0 sends one.
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as ckpt:
        checkpoint = None
        if dist.get_rank() == 0:
            open(os.path.join(ckpt, "done"), "w").close()
            checkpoint = ray.train.Checkpoint.from_directory(ckpt)
        ray.train.report({"workers": everyone}, checkpoint=checkpoint)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_train_shard_two_workers(tmp_path):
    ray = _ray()
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_train_loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}
        ),
        datasets={"train": ray.data.range_tensor(100).materialize()},
        run_config=ray.train.RunConfig(name="trd-iter-torch", storage_path=str(tmp_path)),
    )
    workers = trainer.fit().metrics["workers"]
    assert len(workers) == 2
    for w in workers:
        assert w["rows"] == [50, 50], workers  # every epoch, each worker half the rows
        assert w["in_worker"], workers  # device="auto" asked Ray Train for the device...
        assert w["devices"] == [w["train_device"]], workers  # ... and used it


# -- test_iterator.py (torch parts) ------------------------------------------------------------
def test_default_conversion_is_a_dict_of_tensors():
    ray = _ray()
    got = list(trd.iter_torch_batches(ray.data.range(5)))
    assert len(got) == 1 and isinstance(got[0]["id"], torch.Tensor)
    assert sorted(got[0]["id"].tolist()) == list(range(5))  # no order promised (see below)


def test_the_iterable_runs_again():
    ray = _ray()
    batches = trd.iter_torch_batches(ray.data.range(5))
    for _epoch in range(2):
        seen = [b["id"].tolist() for b in batches]
        # Without preserve_order neither Ray nor we promise an order: range(5) is 5 read
        # tasks, and both CPUs run them from the start (Ray's own iterator usually runs
        # one at a time for its first second, its limits being zero until Ray Data's
        # autoscaling coordinator answers; torch_raydata sizes them to the cluster).
        assert len(seen) == 1 and sorted(seen[0]) == list(range(5))
    ordered = ray.data.range(5)
    ordered.context.execution_options.preserve_order = True
    batches = trd.iter_torch_batches(ordered)
    for _epoch in range(2):
        assert [b["id"].tolist() for b in batches] == [list(range(5))]


def test_a_broken_epoch_restarts_from_the_first_rows():
    ray = _ray()
    ds = ray.data.range(100)
    ds.context.execution_options.preserve_order = True  # "the first rows" needs an order
    batches = trd.iter_torch_batches(ds, batch_size=50)
    for _epoch in range(2):
        seen = []
        for i, batch in enumerate(batches):
            if i > 0:
                break
            seen += batch["id"].tolist()
        assert seen == list(range(50))


def _plus_five(batch: dict[str, np.ndarray]) -> torch.Tensor:
    assert isinstance(batch, dict) and isinstance(batch["id"], np.ndarray)
    return torch.as_tensor(batch["id"] + 5)


def test_plain_collate_fn_gets_numpy_and_its_rules():
    ray = _ray()
    ds = ray.data.range(5)
    for batch in trd.iter_torch_batches(ds, collate_fn=_plus_five):
        assert isinstance(batch, torch.Tensor) and sorted(batch.tolist()) == list(range(5, 10))
    with pytest.raises(ValueError, match="collate_fn cannot be used with dtypes"):
        trd.iter_torch_batches(ds, collate_fn=_plus_five, dtypes=torch.float32)
    for batch in trd.iter_torch_batches(ds, collate_fn=_plus_five, device="cpu"):
        assert batch.device.type == "cpu" and sorted(batch.tolist()) == list(range(5, 10))
    # Outside a Ray Train worker "auto" is the CPU, whatever Ray Train's device would be.
    with patch("ray.train.torch.get_device", lambda: torch.device("cuda")):
        for batch in trd.iter_torch_batches(ds, collate_fn=_plus_five):
            assert batch.device.type == "cpu" and sorted(batch.tolist()) == list(range(5, 10))


def test_auto_device_inside_a_ray_train_worker_is_the_workers():
    ray = _ray()
    meta = torch.device("meta")  # a device no transport serves: proves "auto" asked Ray Train
    with patch("torch_raydata.drop_in.ray_train_device", lambda: meta):
        with pytest.raises(ValueError, match="meta"):
            trd.iter_torch_batches(ray.data.range(5))


@pytest.mark.parametrize("chunked", [False, True], ids=["array", "chunked"])
def test_null_type_column_is_nan(chunked):
    ray = _ray()
    if chunked:
        col = pa.chunked_array([pa.array([None], pa.null()), pa.array([None, None], pa.null())])
    else:
        col = pa.array([None, None, None], type=pa.null())
    table = pa.table({"fruit_apple": col, "n": pa.array([1, 2, 3])})
    for batch in trd.iter_torch_batches(ray.data.from_arrow(table)):
        t = batch["fruit_apple"]
        assert isinstance(t, torch.Tensor) and t.shape == (3,) and t.dtype == torch.float32
        assert torch.isnan(t).all() and batch["n"].tolist() == [1, 2, 3]


def _image_dataset():
    ray = _ray()
    rng = np.random.default_rng(0)
    rows = [
        {f"image_{i}": rng.integers(0, 255, size=224 * 224 * 3, dtype=np.uint8) for i in range(8)}
        for _ in range(10)
    ]
    return ray.data.from_arrow([pa.Table.from_pylist(rows)])


def test_collate_threads_do_not_change_batches():
    from ray.data.collate_fn import DefaultCollateFn

    ds = _image_dataset()
    one = list(trd.iter_torch_batches(ds, batch_size=5, prefetch_batches=0))
    four = list(trd.iter_torch_batches(ds, batch_size=5, prefetch_batches=4))
    # Ray's own default collate, threaded or not, passed as an ArrowBatchCollateFn.
    rays = [
        list(trd.iter_torch_batches(ds, batch_size=5, collate_fn=DefaultCollateFn(num_workers=n)))
        for n in (4, 0)
    ]
    assert len(one) == len(four) == len(rays[0]) == len(rays[1]) == 2
    for a, b, r4, r0 in zip(one, four, *rays, strict=True):
        assert set(a) == set(b) == set(r4) == set(r0) == {f"image_{i}" for i in range(8)}
        for col in a:
            assert torch.equal(a[col], b[col])
            assert torch.equal(torch.cat(list(r4[col])), a[col])
            assert torch.equal(torch.cat(list(r0[col])), a[col])


# -- Ray's collate base classes (the docstring examples of iter_torch_batches) ----------------
def test_each_collate_base_class_gets_its_format():
    ray = _ray()
    from ray.data.collate_fn import ArrowBatchCollateFn, NumpyBatchCollateFn, PandasBatchCollateFn

    seen = {}

    class Arrow(ArrowBatchCollateFn):
        def __call__(self, batch):
            seen["arrow"] = type(batch)
            return torch.as_tensor(batch["col_1"].to_numpy() + 5)

    class Numpy(NumpyBatchCollateFn):
        def __call__(self, batch):
            seen["numpy"] = type(batch["col_1"])
            return torch.as_tensor(batch["col_1"] + 5)

    class Pandas(PandasBatchCollateFn):
        def __call__(self, batch):
            seen["pandas"] = type(batch)
            return torch.as_tensor(batch["col_1"].to_numpy() + 5)

    ds = ray.data.from_items([{"col_1": 1, "col_2": 2}, {"col_1": 3, "col_2": 4}])
    for fn in (Arrow(), Numpy(), Pandas()):
        assert [b.tolist() for b in trd.iter_torch_batches(ds, collate_fn=fn)] == [[6, 8]]
    assert seen == {"arrow": pa.Table, "numpy": np.ndarray, "pandas": pd.DataFrame}


# -- dtypes, inputs, refusals -------------------------------------------------------------------
def test_dtypes_one_for_all_or_some_columns():
    ray = _ray()
    ds = ray.data.from_items([{"a": i, "b": float(i), "c": i} for i in range(6)])
    (batch,) = trd.iter_torch_batches(ds, dtypes=torch.float16)
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys("abc", torch.float16)
    (batch,) = trd.iter_torch_batches(ds, dtypes={"a": torch.float32})  # Ray: KeyError on b
    assert (batch["a"].dtype, batch["b"].dtype, batch["c"].dtype) == (
        torch.float32,
        torch.float64,
        torch.int64,
    )
    assert batch["a"].tolist() == [float(i) for i in range(6)]
    with pytest.raises(ValueError, match=r"dtypes names column\(s\) \['zzz'\]"):
        trd.iter_torch_batches(ds, dtypes={"zzz": torch.float32})


def test_materialized_dataset_and_data_iterator_inputs():
    ray = _ray()
    ds = ray.data.range(40)
    for data in (ds.materialize(), ds.iterator()):
        batches = trd.iter_torch_batches(data, batch_size=16, drop_last=True)
        for _epoch in range(2):
            got = [b["id"] for b in batches]
            assert [len(t) for t in got] == [16, 16]
            assert len(set(torch.cat(got).tolist())) == 32


def test_local_shuffle_seeded_per_epoch_every_row_once():
    ray = _ray()
    ds = ray.data.range(200, override_num_blocks=1)

    def epochs(seed):
        b = trd.iter_torch_batches(
            ds, batch_size=20, local_shuffle_buffer_size=64, local_shuffle_seed=seed
        )
        return [torch.cat([x["id"] for x in b]).tolist() for _ in range(2)]

    first, again = epochs(7), epochs(7)
    assert first == again  # same seed: same order, epoch by epoch
    assert first[0] != first[1]  # each epoch its own order
    assert all(sorted(e) == list(range(200)) and e != list(range(200)) for e in first)


def test_refused_up_front():
    ray = _ray()
    ds = ray.data.range(5)
    with pytest.raises(ValueError, match="batch_size=None"):
        trd.iter_torch_batches(ds, batch_size=None)
    with pytest.raises(TypeError, match="ray.data.Dataset or ray.data.DataIterator"):
        trd.iter_torch_batches([1, 2, 3])
    with pytest.raises(ValueError, match="is not callable"):
        trd.iter_torch_batches(ds, collate_fn=42)
    with pytest.raises(ValueError, match="prefetch_batches=-1"):
        trd.iter_torch_batches(ds, prefetch_batches=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            trd.iter_torch_batches(ds, pin_memory=True)


def test_stats_and_close_of_the_iterable():
    ray = _ray()
    batches = trd.iter_torch_batches(ray.data.range(30), batch_size=10)
    assert sum(len(b["id"]) for b in batches) == 30
    st = batches.stats()
    assert (st.batches, st.rows) == (3, 30)
    batches.close()


def test_list_columns_equal_length_stack_ragged_names_padcollate():
    ray = _ray()
    ds = ray.data.from_items([{"v": [i, i + 1, i + 2]} for i in range(4)])
    (batch,) = trd.iter_torch_batches(ds)
    assert batch["v"].shape == (4, 3) and batch["v"][2].tolist() == [2, 3, 4]
    ragged = ray.data.from_items([{"v": list(range(i + 1))} for i in range(4)])
    with pytest.raises(ValueError, match="PadCollate"):
        list(trd.iter_torch_batches(ragged))
    # Our own collates take the Arrow table, as an ArrowBatchCollateFn would.
    (batch,) = trd.iter_torch_batches(ragged, collate_fn=trd.collate.PadCollate(["v"]))
    assert batch["v"].shape == (4, 4)
