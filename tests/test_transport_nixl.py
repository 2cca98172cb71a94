"""NixlTransport and the remote epoch: planning without Ray, both NIXL ends in one process,
then whole epochs through collate actors on the session's small local Ray.

Remote epochs start two actors each (a few seconds here: a fresh process importing torch),
so the Ray tests are few and each checks several things.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

import torch_raydata as trd
from torch_raydata.collate import DefaultCollate
from torch_raydata.pipeline.batching import blocks_to_batches
from torch_raydata.pipeline.types import SourceBlock
from torch_raydata.transports import NixlTransport, resolve_transport
from torch_raydata.transports.nixl import NixlTransferError
from torch_raydata.transports.nixl.epoch import RemoteCollateError
from torch_raydata.transports.nixl.plan import plan_batches
from torch_raydata.transports.nixl.worker import CollateWorker

from .fakes import assert_same_batch as _assert_same
from .fakes import dead_actors as _dead
from .fakes import make_blocks

# -- stage 3 on metadata: the same batches as the local path --------------------------------


def _store_and_blocks(sizes, slices=None):
    tables = make_blocks(sizes)
    store = {f"b{i}": t for i, t in enumerate(tables)}
    blocks = []
    for i, t in enumerate(tables):
        rows = slices.get(i) if slices else None
        n = t.num_rows if rows is None else rows[1] - rows[0]
        blocks.append(SourceBlock(ref=f"b{i}", size_bytes=t.nbytes, num_rows=n, rows=rows))
    return store, blocks


def _local_and_planned(sizes, slices, **kw):
    """Stage 3's batches and the remote plans of the same blocks, as (table, ids) pairs."""
    store, blocks = _store_and_blocks(sizes, slices)
    local = list(
        blocks_to_batches(
            ((sb, store[sb.ref]) for sb in blocks), batch_size=16, id_column="id", **kw
        )
    )
    plans = list(plan_batches(blocks, batch_size=16, **kw))
    assert [p.idx for p in plans] == [b.idx for b in local]
    assert [p.num_rows for p in plans] == [b.num_rows for b in local]
    get = lambda refs: [store[r] for r in refs]  # noqa: E731
    return [(b.table(), b.ids) for b in local], [p.materialize("id", get=get) for p in plans]


_SIZES, _SLICES = [37, 0, 100, 5, 64, 81], {2: (10, 90), 4: (3, 64)}


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"drop_last": True},
        {"shuffle_buffer_size": 50, "shuffle_seed": 3},
        {"shuffle_buffer_size": 500, "shuffle_seed": 7, "drop_last": True, "epoch": 2},
    ],
)
def test_plans_give_the_local_batches(kw):
    local, planned = _local_and_planned(_SIZES, _SLICES, **kw)
    for (want, want_ids), (table, ids) in zip(local, planned, strict=True):
        assert table.equals(want)
        assert np.array_equal(ids, want_ids)


def test_one_shuffle_draw_serves_both_paths(monkeypatch):
    """The plans have no draw of their own: replacing stage 3's draw (here by one that
    takes the newest rows first) changes both paths alike, so they still agree."""
    from torch_raydata.pipeline.batching import ShuffleDraw

    kw = {"shuffle_buffer_size": 50, "shuffle_seed": 3}
    seeded, _ = _local_and_planned(_SIZES, _SLICES, **kw)

    def newest_first(self, count):
        rows, self.live = self.live[len(self.live) - count :], self.live[: len(self.live) - count]
        return rows

    monkeypatch.setattr(ShuffleDraw, "draw", newest_first)
    local, planned = _local_and_planned(_SIZES, _SLICES, **kw)
    assert [t.column("id").to_pylist() for t, _ in local] != [
        t.column("id").to_pylist() for t, _ in seeded
    ]  # the replaced draw took effect ...
    for (want, want_ids), (table, ids) in zip(local, planned, strict=True):
        assert table.equals(want) and np.array_equal(ids, want_ids)  # ... on both paths


@pytest.mark.parametrize("scattered", [False, True], ids=["ranges", "scattered"])
@pytest.mark.parametrize("kw", [{}, {"shuffle_buffer_size": 40, "shuffle_seed": 1}])
def test_plans_of_a_resumed_epoch_drop_the_consumed_rows_like_the_local_path(kw, scattered):
    from torch_raydata.resume import ids_as_uint64
    from torch_raydata.transports.nixl.plan import kept_rows

    store, blocks = _store_and_blocks([37, 100, 5, 64], slices={1: (10, 90)})
    consumed = np.arange(0, 206, 3) if scattered else np.r_[0:20, 40:45, 137:150, 200:205]
    keys = np.sort(ids_as_uint64(consumed))
    local = list(
        blocks_to_batches(
            ((sb, store[sb.ref]) for sb in blocks),
            batch_size=16,
            id_column="id",
            drop_keys=keys,
            **kw,
        )
    )
    plans = list(
        plan_batches(
            blocks,
            batch_size=16,
            keep_rows=lambda sb: kept_rows(store[sb.ref], sb.rows, keys, "id"),
            **kw,
        )
    )
    get = lambda refs: [store[r] for r in refs]  # noqa: E731
    assert len(plans) == len(local)
    for plan, batch in zip(plans, local, strict=True):
        table, ids = plan.materialize("id", get=get)
        assert table.equals(batch.table()) and np.array_equal(ids, batch.ids)


def test_plans_need_row_counts():
    blocks = [SourceBlock(ref="b0", size_bytes=10, num_rows=None)]
    with pytest.raises(ValueError, match="transport='local'"):
        list(plan_batches(blocks, batch_size=4))


# -- both NIXL ends in this process (no actors) -----------------------------------------------


class _Plan:
    """A BatchPlan stand-in that materializes a given table."""

    def __init__(self, idx, table):
        self.idx, self.table, self.num_rows = idx, table, table.num_rows

    def materialize(self, id_column=None, get=None):
        ids = self.table.column(id_column).to_numpy() if id_column else None
        return self.table, ids


class _Recorder:
    """Wraps an agent and records the order of transfer/check calls (the detector)."""

    def __init__(self, agent):
        self._agent = agent
        self.calls = []

    def transfer(self, h, *a):
        self.calls.append("post")
        return self._agent.transfer(h, *a)

    def check_xfer_state(self, h):
        self.calls.append("check")
        return self._agent.check_xfer_state(h)

    def __getattr__(self, name):
        return getattr(self._agent, name)


def _table(n, start=0):
    ids = np.arange(start, start + n, dtype=np.int64)
    img = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(ids % 251, 48).astype(np.uint8)), 48)
    return pa.table(
        {"id": ids, "x": ids.astype(np.float32) / 3, "img": img, "s": [str(i) for i in ids]}
    )


@pytest.fixture
def ends():
    worker = CollateWorker("trd-test-worker", DefaultCollate(), id_column="id", max_slabs=6)
    transport = NixlTransport(in_flight=3)
    yield worker, transport
    transport.close()
    worker.close()


def test_reads_of_several_batches_are_posted_before_any_wait(ends):
    worker, transport = ends
    rec = transport._agent = _Recorder(transport.agent)
    transport._pool._agent = rec
    descs = [worker.collate(_Plan(i, _table(100, 100 * i))) for i in range(3)]
    req = transport.fetch_multiple(descs)
    assert rec.calls == ["post"] * 3  # all three READs in flight, none waited on yet
    out = transport.wait_fetch_complete(req)
    assert rec.calls[:3] == ["post"] * 3 and "check" in rec.calls[3:]
    for i, batch in enumerate(out):
        want = DefaultCollate()(_table(100, 100 * i))
        assert batch.keys() == want.keys()
        for k in ("id", "x", "img"):
            assert batch[k].dtype == want[k].dtype and torch.equal(batch[k], want[k])
        assert batch["s"] == want["s"]  # non-tensor values travel inline
    assert np.array_equal(descs[1].ids, np.arange(100, 200))


def test_source_buffers_are_reused_after_the_read_is_confirmed(ends):
    worker, transport = ends
    for i in range(20):
        (batch,) = transport.wait_fetch_complete(
            transport.fetch_multiple([worker.collate(_Plan(i, _table(64, 64 * i)))])
        )
        assert int(batch["id"][0]) == 64 * i
    deadline = time.monotonic() + 10  # the last READ's notification may still be on the wire
    while (st := worker.stats())["busy"] and time.monotonic() < deadline:
        time.sleep(0.001)
    # One slab for the first batch (collated into plain memory, then packed), then reused:
    # each READ's notification freed the slab before the next batch.
    assert st["busy"] == 0 and st["allocations"] <= 2, st


def test_handed_out_batches_own_their_memory_until_dropped(ends):
    worker, transport = ends
    first = transport.wait_fetch_complete(
        transport.fetch_multiple([worker.collate(_Plan(0, _table(64)))])
    )[0]
    first["x"].mul_(0)  # the training step may modify its batch in place
    held = first["img"].clone()
    second = transport.wait_fetch_complete(
        transport.fetch_multiple([worker.collate(_Plan(1, _table(64, 64)))])
    )[0]
    assert torch.equal(first["img"], held)  # not overwritten by the next READ
    assert first["x"].data_ptr() != second["x"].data_ptr()
    pool = transport.pool
    free = pool.free_buffers
    del first, held
    gc.collect()
    assert pool.free_buffers == free + 1  # the lease gave the buffer back
    third = transport.wait_fetch_complete(
        transport.fetch_multiple([worker.collate(_Plan(2, _table(64, 128)))])
    )[0]
    assert pool.registered == 2  # the returned buffer was reused, none registered
    assert int(third["id"][0]) == 128 and int(second["id"][0]) == 64


def test_pad_collate_in_an_actor_allocates_from_its_slabs_and_stays_the_same_collate():
    from torch_raydata.collate import PadCollate
    from torch_raydata.transports.nixl.worker import with_allocator

    shapes = []

    def allocator(shape, dtype):
        shapes.append(tuple(shape))
        return torch.empty(shape, dtype=dtype)

    pad = PadCollate(["tok"], pad_value=-1, max_length=3, dtypes={"tok": torch.int32})
    mine = with_allocator(pad, allocator)
    table = pa.table({"tok": [[1, 2, 3, 4], [5]], "id": [0, 1]})
    got, want = mine(table), pad(table)
    assert repr(mine) == repr(pad).replace("allocator=None", f"allocator={allocator!r}")
    assert "allocator=None" in repr(pad)  # the original is untouched
    assert (2, 3) in shapes  # the padded values (and mask) came from the allocator
    for k in want:
        assert torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype, k


def test_user_collate_fn_output_is_packed_and_copy_mode():
    def collate(table):  # plain tensors, a non-contiguous one, nesting and a scalar
        x = torch.tensor(table.column("x").to_numpy()).reshape(-1, 2)
        return (x.t(), {"ids": torch.tensor(table.column("id").to_numpy()), "n": len(table)}, [])

    worker = CollateWorker("trd-test-worker-user", collate, max_slabs=4)
    transport = NixlTransport(copy=True)
    try:
        for i in range(3):
            table = _table(40, 40 * i)
            (got,) = transport.wait_fetch_complete(
                transport.fetch_multiple([worker.collate(_Plan(i, table))])
            )
            want = collate(table)
            assert torch.equal(got[0], want[0]) and got[0].is_contiguous()
            assert torch.equal(got[1]["ids"], want[1]["ids"]) and got[1]["n"] == 40 and got[2] == []
        assert transport.pool.free_buffers == 1  # copy mode: the buffer came back at once
    finally:
        transport.close()
        worker.close()


def test_a_read_nixl_refuses_is_an_error_naming_the_batch(ends):
    worker, transport = ends
    desc = worker.collate(_Plan(8, _table(10)))
    bogus = dataclasses.replace(desc, addr=desc.addr + (1 << 40))  # not registered remotely
    with pytest.raises(NixlTransferError, match="batch 8"):
        transport.wait_fetch_complete(transport.fetch_multiple([bogus]))
    assert transport.pool.free_buffers == transport.pool.registered  # buffer released
    (ok,) = transport.wait_fetch_complete(transport.fetch_multiple([desc]))  # still usable
    assert ok["id"].tolist() == list(range(10))


def test_nixl_is_the_remote_collate_transport():
    from torch_raydata.transports import LocalTransport, RemoteCollate
    from torch_raydata.transports.nixl.epoch import RemoteEpochRun

    transport = NixlTransport()
    assert isinstance(transport, RemoteCollate) and not isinstance(LocalTransport(), RemoteCollate)
    assert transport.epoch_class() is RemoteEpochRun  # what RayIterableDataset runs with it


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl._api", None)  # `import nixl._api` now fails
    with pytest.raises(ImportError, match=r"pip install 'torch_raydata\[nixl\]'"):
        NixlTransport()
    with pytest.raises(ImportError, match=r"torch_raydata\[nixl\]"):
        resolve_transport("nixl", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_device_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        NixlTransport("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_transport("nixl", "cuda")


# -- whole epochs through collate actors --------------------------------------------------------


class _Detector(NixlTransport):
    """Counts READs posted (and not yet waited on) when the first wait starts."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.posted_at_first_wait = None
        self.lock = threading.Lock()

    def wait_fetch_complete(self, request, timeout=None):
        with self.lock:
            if self.posted_at_first_wait is None:
                self.posted_at_first_wait = self.reads_posted
        return super().wait_fetch_complete(request, timeout)


def test_epoch_bytes_equal_local_with_reads_in_flight_and_cleanup(rows):
    local = list(
        trd.RayIterableDataset(rows, batch_size=16, preserve_order=True, transport="local")
    )
    transport = _Detector(in_flight=4)
    ds = trd.RayIterableDataset(rows, batch_size=16, preserve_order=True, transport=transport)
    run = iter(ds)
    actors = list(run.actors)
    got = list(run)
    assert len(got) == len(local) == 207  # 3,300 rows / 16, last one partial
    for a, b in zip(local, got, strict=True):
        _assert_same(a, b)
    assert transport.posted_at_first_wait == 4  # a whole group of READs before any wait
    st = ds.stats()
    assert st.rows == 3300 and st.batches == 207 and st.buffered_batches == 0
    assert st.stage_seconds["collate"] > 0  # measured in the actors
    # The exhausted epoch handed its actors back: kept for the next epoch.
    assert run.actors == [] and transport.live_actors == 2 and ds.stats().collate_actors == 2
    del got, local, a, b
    gc.collect()
    pool = transport.pool
    assert pool.free_buffers == pool.registered  # every destination buffer came back
    ds.close()  # kills the actors and forgets their agents
    assert transport.live_actors == 0 and transport._loaded == {}
    assert _dead(actors)


def _pids(actors):
    import ray

    return [ray.get(a.stats.remote())["pid"] for a in actors]


def test_shuffle_ids_and_drop_last_match_the_local_path_and_break_leaves_actors_reusable(rows):
    kw = dict(
        batch_size=50, shuffle_buffer_size=700, shuffle_seed=5, drop_last=True, id_column="id"
    )
    local_ds = trd.RayIterableDataset(rows, preserve_order=True, **kw)
    local = list(local_ds)
    ds = trd.RayIterableDataset(rows, preserve_order=True, transport="nixl", **kw)
    got = list(ds)
    assert len(got) == len(local) == 66
    for a, b in zip(local, got, strict=True):
        _assert_same(a, b)
    # Break early (epoch 1), with plans, descriptors and READs still in flight ...
    run = iter(ds)
    actors = list(run.actors)
    for i, _batch in enumerate(run):
        if i == 2:
            break
    run.close()
    assert run.actors == [] and ds.transport.live_actors == 2
    del _batch, got, a, b
    gc.collect()
    assert ds.transport.pool.free_buffers == ds.transport.pool.registered
    # ... then a whole epoch (2) on the same actors gives exactly the local path's batches.
    run = iter(ds)
    assert run.actors == actors
    again = list(run)
    local_ds.set_epoch(2)
    local = list(local_ds)
    assert len(again) == len(local) == 66
    for a, b in zip(local, again, strict=True):
        _assert_same(a, b)
    del again, a, b
    gc.collect()
    import ray

    for actor in actors:  # nothing of the broken epoch is left busy in the actors
        st = ray.get(actor.stats.remote())
        deadline = time.monotonic() + 10  # the last READs' notifications may be on the wire
        while st["busy"] and time.monotonic() < deadline:
            time.sleep(0.01)
            st = ray.get(actor.stats.remote())
        assert st["busy"] == 0, st
    ds.close()
    local_ds.close()
    assert _dead(actors)


def test_actors_live_across_epochs_and_die_with_the_dataset(rows):
    ds = trd.RayIterableDataset(rows, batch_size=256, transport="nixl")
    seen = []
    for _ in range(3):
        run = iter(ds)
        seen.append((list(run.actors), _pids(run.actors)))
        assert sum(len(b["id"]) for b in run) == 3300
    (actors, pids), *later = seen
    assert all(a == actors and p == pids for a, p in later)  # started once, by epoch 0
    assert ds.stats().collate_actors == ds.transport.live_actors == 2
    ds.close()
    assert ds.transport.live_actors == 0
    assert _dead(actors)
    # Without close(): the dataset's garbage collection kills them (weakref.finalize).
    ds = trd.RayIterableDataset(rows, batch_size=256, transport="nixl")
    run = iter(ds)
    actors = list(run.actors)
    next(run)
    del ds, run
    gc.collect()
    assert _dead(actors)


@pytest.mark.timeout(120)
def test_actor_killed_mid_epoch_is_an_error_naming_the_batch(rows):
    import ray

    ds = trd.RayIterableDataset(
        rows, batch_size=16, transport=NixlTransport(xfer_timeout=10), prefetch_batches=2
    )
    run = iter(ds)
    next(run)
    actors = list(run.actors)
    ray.kill(actors[0], no_restart=True)
    with pytest.raises((RemoteCollateError, NixlTransferError), match=r"batch \d+") as info:
        for _ in run:
            pass
    assert "trd-collate-" in str(info.value)  # names the actor (agent) too
    assert run.closed and run.actors == []
    assert ds.transport.live_actors == 0  # a failed epoch's actors are not reused
    assert _dead(actors)
    ds.close()


def test_collate_error_in_an_actor_keeps_its_type_and_names_the_batch(rows):
    def bad(table):
        if int(table.column("id")[0].as_py()) >= 256:
            raise KeyError("no such column, on purpose")
        return DefaultCollate()(table)

    ds = trd.RayIterableDataset(
        rows, batch_size=64, preserve_order=True, transport="nixl", collate_fn=bad
    )
    with pytest.raises(KeyError, match="on purpose") as info:
        list(ds)
    assert any("batch 4" in n for n in getattr(info.value, "__notes__", [])), info.value
    ds.close()


class _Unpicklable:
    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, table):
        return DefaultCollate()(table)


def test_unpicklable_collate_fn_is_a_clear_error(rows):
    ds = trd.RayIterableDataset(rows, transport="nixl", collate_fn=_Unpicklable())
    with pytest.raises(TypeError, match="must be picklable"):
        iter(ds)
    ds.close()


@pytest.mark.timeout(120)
def test_read_from_an_actor_that_died_after_collating_names_the_batch(rows):
    import ray

    from torch_raydata.pipeline.source import RaySource

    transport = NixlTransport(num_actors=1, xfer_timeout=10)
    [(actor, _name)] = transport.acquire_workers(DefaultCollate(), id_column=None, max_slabs=4)
    blocks = RaySource(rows).open()
    try:
        plan = next(plan_batches(iter(blocks), batch_size=16))
        desc = ray.get(actor.collate.remote(plan))  # collated, waiting for its READ ...
    finally:
        blocks.close()
    ray.kill(actor, no_restart=True)  # ... when its actor dies
    assert _dead([actor])
    with pytest.raises(NixlTransferError, match="batch 0"):
        transport.wait_fetch_complete(transport.fetch_multiple([desc]))
    assert transport.pool.free_buffers == transport.pool.registered
    transport.close()


def test_exact_resume_matches_the_local_path(rows):
    kw = dict(
        batch_size=32, id_column="id", shuffle_buffer_size=200, shuffle_seed=0, preserve_order=True
    )
    first_loader = trd.RayIterableDataset(rows, transport="nixl", **kw)
    it = iter(first_loader)
    first = [next(it)["id"].numpy() for _ in range(10)]
    state = first_loader.state_dict()
    it.close()
    assert state["exact"]
    # A materialized dataset resumes by dropping consumed rows in stage 3: here, per block,
    # by a Ray task reading the ID column; the plans gather the kept rows.
    resumed = trd.RayIterableDataset(rows, transport="nixl", **kw)
    resumed.load_state_dict(state)
    rest = [b["id"].numpy() for b in resumed]
    ids = np.concatenate(first + rest)
    assert sorted(ids.tolist()) == list(range(3300))
    local = trd.RayIterableDataset(rows, transport="local", **kw)
    local.load_state_dict(state)
    for a, b in zip([b["id"].numpy() for b in local], rest, strict=True):
        assert np.array_equal(a, b)  # the same batches as the local path's resume
    for ds in (first_loader, resumed, local):
        ds.close()
