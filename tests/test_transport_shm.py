"""ShmTransport: the slab protocol in one process (an actor body and the trainer's end,
no Ray), then whole epochs through collate actors on the session's small local Ray.

The slab protocol is what keeps a batch's bytes intact while the step holds it: a test
below fails if the trainer frees a slab when it hands the batch out instead of when the
batch's last tensor dies, if a new epoch frees slabs the step still holds, or if the
actor reuses a slab the trainer has not given back.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch

import torch_raydata as trd
from torch_raydata.collate import DefaultCollate
from torch_raydata.pipeline.transport import RemoteCollate
from torch_raydata.transports import ShmTransport, resolve_transport
from torch_raydata.transports.shm import ShmMapError
from torch_raydata.transports.shm.worker import (
    FREE,
    HELD,
    MAPPED,
    WRITTEN,
    ShmBatch,
    ShmCollateWorker,
)

from .fake_cuda import FakeGPU
from .fakes import assert_same_batch as _assert_same
from .fakes import dead_actors as _dead

# -- the slab protocol, in one process ------------------------------------------------------


@dataclass
class _Plan:
    """What a collate actor gets: a batch's table (here given, not fetched)."""

    idx: int
    table: pa.Table

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def materialize(self, id_column=None, get=None):
        ids = None if id_column is None else self.table.column(id_column).to_numpy()
        return self.table, ids


def _table(idx: int, rows: int = 64) -> pa.Table:
    """Every value of batch ``idx`` is ``idx`` (and an img column of 3 KiB per row)."""
    return pa.table(
        {
            "id": np.full(rows, idx, np.int64),
            "img": pa.FixedShapeTensorArray.from_numpy_ndarray(
                np.full((rows, 3, 32, 32), idx % 251, np.uint8)
            ),
        }
    )


@pytest.fixture
def ends():
    """An actor body and the trainer's end, both here (the path is /proc/<this pid>/fd)."""
    worker = ShmCollateWorker("w0", DefaultCollate(), max_slabs=2)
    transport = ShmTransport()
    yield worker, transport
    transport.close()
    worker.close()


def _hand_out(worker, transport, idx, generation=1, rows=64):
    desc = worker.collate(_Plan(idx, _table(idx, rows)), generation)
    assert isinstance(desc, ShmBatch)
    [batch] = transport.wait_fetch_complete(transport.fetch_multiple([desc]))
    return desc, batch


def _states(worker):
    return {sid: int(s.raw[0]) for sid, s in worker._slabs.items()}


def _check(batch, idx):
    assert (batch["id"] == idx).all() and (batch["img"] == idx % 251).all(), idx


def test_a_batch_is_a_view_of_its_slab_until_its_last_tensor_dies(ends):
    """Removal caught: the lease (freeing the slab when the batch is handed out)."""
    worker, transport = ends
    desc = worker.collate(_Plan(0, _table(0)), 1)
    assert _states(worker) == {desc.slab: WRITTEN}
    [batch] = transport.wait_fetch_complete(transport.fetch_multiple([desc]))
    _check(batch, 0)
    assert batch["img"].shape == (64, 3, 32, 32) and batch["img"].dtype == torch.uint8
    slab = worker._slabs[desc.slab]
    # No copy in the trainer: the tensor is the actor's slab, mapped here.
    assert _states(worker) == {desc.slab: HELD}
    view = batch["img"][5:7]  # a view alone keeps the slab, like the whole batch
    del batch
    gc.collect()
    assert _states(worker) == {desc.slab: HELD}
    # While held, the next batches go to other slabs: the view's bytes stay.
    for i in range(1, 4):
        _check(_hand_out(worker, transport, i)[1], i)
    assert (view == 0).all()
    del view
    gc.collect()
    assert int(slab.raw[0]) == FREE
    nxt, batch = _hand_out(worker, transport, 9)
    _check(batch, 9)
    assert worker.allocations == 2  # two slabs served every batch above


def test_a_held_batch_keeps_its_slab_when_a_new_epoch_begins(ends):
    """Removal caught: freeing handed-out (HELD) slabs at a new generation."""
    worker, transport = ends
    _, held = _hand_out(worker, transport, 3, generation=1)
    orphan = worker.collate(_Plan(4, _table(4)), 1)  # collated, never taken: epoch closed
    assert _states(worker)[orphan.slab] == WRITTEN
    for i in range(10, 20):  # epoch 2 on the same actor
        _check(_hand_out(worker, transport, i, generation=2)[1], i)
    _check(held, 3)
    # The orphan's slab was freed by the new epoch and served all of it; the held one
    # (first in line for reuse) was not touched.
    assert worker.allocations == 2
    del held
    gc.collect()
    assert set(_states(worker).values()) == {FREE}


def test_trainer_mapping_closes_the_actors_descriptor_and_later_batches_need_no_path(ends):
    worker, transport = ends
    first, batch = _hand_out(worker, transport, 0)
    assert first.path == f"/proc/{os.getpid()}/fd/{worker._slabs[first.slab].fd}"
    assert worker._slabs[first.slab].raw[MAPPED] == 1
    del batch
    gc.collect()
    again, batch = _hand_out(worker, transport, 1)  # the same slab, reused
    assert again.slab == first.slab and again.path == ""
    assert worker.stats()["fds"] == 0
    _check(batch, 1)
    assert transport.slabs_mapped == 1


def test_free_slabs_beyond_the_bound_are_unmapped_on_both_ends(ends):
    worker, transport = ends  # max_slabs=2: free slabs kept for reuse
    held = [_hand_out(worker, transport, i)[1] for i in range(5)]
    assert worker.stats()["held"] == 5  # holding batches never blocks the actor
    del held
    gc.collect()
    _, batch = _hand_out(worker, transport, 7, rows=200)  # larger: smaller free ones go
    _check(batch, 7)
    assert len(worker._slabs) <= 3
    assert set(transport._maps["w0"]) <= set(worker._slabs)


def test_zero_row_and_non_tensor_batches_hold_no_slab(ends):
    worker, transport = ends
    desc = worker.collate(_Plan(2, _table(2, 1).slice(0, 0)), 1)
    [batch] = transport.wait_fetch_complete(transport.fetch_multiple([desc]))
    assert desc.slab == -1 and desc.nbytes == 0 and worker._slabs == {}
    assert batch["img"].shape == (0, 3, 32, 32) and batch["id"].shape == (0,)
    counts = ShmCollateWorker("w1", lambda table: {"n": table.num_rows, "tag": "x"})
    desc = counts.collate(_Plan(5, _table(5)), 1)
    assert desc.slab == -1 and counts._slabs == {}
    assert transport.wait_fetch_complete(transport.fetch_multiple([desc])) == [
        {"n": 64, "tag": "x"}
    ]


def test_cuda_device_copies_out_of_the_slab_and_frees_it_once_posted():
    """A pageable copy reads its source when posted (the fake snapshots it then, late
    copies run later): the slab may go back at once, and the device bytes are right."""
    gpu = FakeGPU()
    worker = ShmCollateWorker("w0", DefaultCollate(), max_slabs=2)
    transport = ShmTransport("cuda:0", ops=gpu)
    try:
        desc, dev = _hand_out(worker, transport, 5)
        assert _states(worker) == {desc.slab: FREE}  # the host view died after the copy
        _, dev2 = _hand_out(worker, transport, 6)  # reuses the slab before the copies run
        dev, dev2 = transport.on_consume(dev), transport.on_consume(dev2)
        probes = [gpu.read(dev["img"]), gpu.read(dev2["img"])]
        gpu.pump()
        assert (probes[0].value == 5).all() and (probes[1].value == 6).all()
        assert transport.memory_stats().pageable_fallbacks == {"not_staged": 4}
    finally:
        transport.close()
        worker.close()


def test_an_unmappable_slab_is_an_error_naming_the_fix():
    transport = ShmTransport()
    desc = ShmBatch(
        idx=3, agent="a", md_version=0, metadata=b"", slab=0, addr=0, nbytes=128,
        tensors=(), skeleton={}, num_rows=1, path="/proc/1/fd/999999", size=1 << 16, live=(0,),
    )  # fmt: skip
    with pytest.raises(ShmMapError, match=r"batch 3.*transport='local'"):
        transport.wait_fetch_complete(transport.fetch_multiple([desc]))
    with pytest.raises(TypeError, match="transport='shm'"):
        transport.fetch_multiple([{"x": torch.zeros(1)}])


def test_shm_is_a_remote_collate_transport_by_name():
    t = resolve_transport("shm", None)
    assert isinstance(t, ShmTransport) and isinstance(t, RemoteCollate)
    assert t.chunk == 8 and t.num_actors == 2
    assert t.in_flight == 16  # room for a full chunk on each actor
    assert ShmTransport(num_actors=3, chunk=4).in_flight == 12
    with pytest.raises(ValueError, match="num_actors"):
        ShmTransport(num_actors=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ShmTransport("cuda")


# -- whole epochs through collate actors -------------------------------------------------------


def _actor_stats(actors):
    import ray

    return [ray.get(a.stats.remote()) for a in actors]


def test_epochs_match_the_local_path_hold_across_epochs_and_clean_up(rows):
    kw = dict(
        batch_size=50, shuffle_buffer_size=700, shuffle_seed=5, drop_last=True, id_column="id"
    )
    local_ds = trd.RayIterableDataset(rows, preserve_order=True, **kw)
    ds = trd.RayIterableDataset(rows, preserve_order=True, transport="shm", **kw)
    local = list(local_ds)
    run = iter(ds)
    actors = list(run.actors)
    got = list(run)  # every batch held at once: the actors make slabs as needed
    assert len(got) == len(local) == 66
    for a, b in zip(local, got, strict=True):
        _assert_same(a, b)
    st = ds.stats()
    assert st.collate_actors == 2 and st.stage_seconds["collate"] > 0  # in the actors
    assert st.loader_cpu_ms_per_batch > 0  # the plan and fetch threads, in this process
    keep = got[3]  # held across the next epochs
    want = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in keep.items()}
    del got, a, b
    gc.collect()
    # Break early, then a whole epoch on the same actors: the local path's batches.
    it = iter(ds)
    assert it.actors == actors
    for i, _b in enumerate(it):
        if i == 1:  # (not 0: a peek, which does not use the epoch up) chunks still at
            break  # the actors, several batches sharing one ref
    it.close()
    del _b
    again = list(ds)
    local_ds.set_epoch(2)
    for a, b in zip(list(local_ds), again, strict=True):
        _assert_same(a, b)
    _assert_same(want, keep)  # untouched by two epochs in the same actors
    del again, a, b
    gc.collect()
    held = sum(s["held"] for s in _actor_stats(actors))
    assert held == 1  # only `keep`'s slab; every other batch gave its slab back
    ds.close()
    _assert_same(want, keep)  # the actors are gone; the batch's memory is still valid
    assert ds.transport.live_actors == 0 and ds.transport._maps == {}
    assert _dead(actors)
    local_ds.close()


def test_streamed_pipeline_and_exact_resume_match_the_local_path(rows):
    import ray

    def double(b):
        return {"id": b["id"], "v": (b["id"] * 2).astype(np.int64)}

    streamed = ray.data.range(1000, override_num_blocks=5).map_batches(double)
    ds = trd.RayIterableDataset(streamed, batch_size=64, transport="shm")
    ids = np.concatenate([b["id"].numpy() for b in ds])
    assert sorted(ids.tolist()) == list(range(1000))
    for b in ds:
        assert (b["v"] == 2 * b["id"]).all()
    ds.close()

    kw = dict(
        batch_size=32, id_column="id", shuffle_buffer_size=200, shuffle_seed=0, preserve_order=True
    )
    first_loader = trd.RayIterableDataset(rows, transport="shm", **kw)
    it = iter(first_loader)
    first = [next(it)["id"].numpy().copy() for _ in range(10)]
    state = first_loader.state_dict()
    it.close()
    assert state["exact"]
    resumed = trd.RayIterableDataset(rows, transport="shm", **kw)
    resumed.load_state_dict(state)
    rest = [b["id"].numpy() for b in resumed]
    assert sorted(np.concatenate(first + rest).tolist()) == list(range(3300))
    local = trd.RayIterableDataset(rows, transport="local", **kw)
    local.load_state_dict(state)
    for a, b in zip([b["id"].numpy() for b in local], rest, strict=True):
        assert np.array_equal(a, b)
    for d in (first_loader, resumed, local):
        d.close()


@pytest.mark.timeout(120)
def test_actor_failures_reach_the_step_with_type_and_batch(rows):
    import ray

    from torch_raydata.transports.nixl.epoch import RemoteCollateError

    def bad(table):
        if int(table.column("id")[0].as_py()) >= 256:
            raise KeyError("no such column, on purpose")
        return DefaultCollate()(table)

    ds = trd.RayIterableDataset(
        rows, batch_size=64, preserve_order=True, transport="shm", collate_fn=bad
    )
    with pytest.raises(KeyError, match="on purpose") as info:
        list(ds)
    assert any("batch 4" in n for n in getattr(info.value, "__notes__", [])), info.value
    ds.close()

    ds = trd.RayIterableDataset(rows, batch_size=16, transport="shm", prefetch_batches=2)
    run = iter(ds)
    first = next(run)
    actors = list(run.actors)
    ray.kill(actors[0], no_restart=True)
    with pytest.raises(RemoteCollateError, match=r"batch \d+"):
        for _ in run:
            pass
    assert run.closed and ds.transport.live_actors == 0
    assert first["id"].shape == (16,)  # a batch taken before the failure stays valid
    ds.close()
    assert _dead(actors)


# -- chunked submission (the remote epoch's plan thread), no Ray -----------------------------


class _FakeActor:
    """Records each call's plans; returns a token standing for its result's ref."""

    def __init__(self):
        self.calls = []
        outer = self

        class _Method:
            def __init__(self, many):
                self.many = many

            def remote(self, plans, generation):
                outer.calls.append([p.idx for p in plans] if self.many else [plans.idx])
                return object()

        self.collate = _Method(False)
        self.collate_many = _Method(True)


def test_chunks_are_cut_before_a_pull_from_the_source_that_may_block():
    """A chunk never waits for the source: the plans of the blocks already here are
    submitted before the planner pulls the next block (which may take long)."""
    import threading

    from torch_raydata.pipeline.types import SourceBlock
    from torch_raydata.transports.nixl.plan import plan_batches
    from torch_raydata.transports.nixl.threads import Chunker, Shared, before_each, plan_loop

    s = Shared(bound=40, num_actors=2)  # no consumer here: room for every plan
    actors = [_FakeActor(), _FakeActor()]
    chunker = Chunker(s, actors, generation=1, chunk=3)
    pulled_third = threading.Event()
    may_go = threading.Event()

    def source():
        for i in range(3):
            if i == 2:
                pulled_third.set()
                assert may_go.wait(30)  # a slow source: the third block comes late
            yield SourceBlock(ref=f"b{i}", size_bytes=100 * 8, num_rows=100)

    plans = plan_batches(before_each(source(), chunker.flush), batch_size=10)
    t = threading.Thread(target=plan_loop, args=(s, plans, chunker))
    t.start()
    try:
        assert pulled_third.wait(30)
        submitted = sorted(i for a in actors for c in a.calls for i in c)
        assert submitted == list(range(20))  # both blocks' batches, before the third arrives
    finally:
        may_go.set()
        t.join(30)
    calls = [c for a in actors for c in a.calls]
    assert sorted(i for c in calls for i in c) == list(range(30))
    # The epoch's first chunks ramp up (1, 2, then `chunk`); each block's last plans go
    # before the next pull: 1+2+3+3+1, then 3+3+3+1 for each block of 10 batches.
    assert sorted(len(c) for c in calls) == sorted([1, 2, 3, 3, 1] + [3, 3, 3, 1] * 2)
    assert s.planner_done and len(s.submitted) == 30
    assert all(a.calls for a in actors)  # to the least-loaded actor


class _HintedSource:
    """Blocks of 100 rows; ``ready()`` (``EpochBlocks.ready``'s hint) is False only
    before a pull that waits: the one of block ``slow``, which comes when ``go`` is set."""

    def __init__(self, n, slow):
        import threading

        self.n, self.slow = n, slow
        self.next = 0  # the block the next pull brings
        self.waiting = threading.Event()
        self.go = threading.Event()

    def ready(self):
        return self.next != self.slow

    def __iter__(self):
        from torch_raydata.pipeline.types import SourceBlock

        for i in range(self.n):
            if i == self.slow:
                self.waiting.set()
                assert self.go.wait(30)
            self.next = i + 1  # what the hook asks about before the next pull
            yield SourceBlock(ref=f"b{i}", size_bytes=100 * 8, num_rows=100)


def test_chunks_span_blocks_while_the_source_says_a_pull_will_not_wait():
    """A pull that will not wait (a MaterializedDataset's blocks, output Ray has queued)
    does not cut the chunk: chunks stay full across block boundaries. Before the slow
    pull the pending plans go at once, so the slow block holds nothing back."""
    import threading

    from torch_raydata.transports.nixl.plan import plan_batches
    from torch_raydata.transports.nixl.threads import Chunker, Shared, before_each, plan_loop

    s = Shared(bound=40, num_actors=2)
    actors = [_FakeActor(), _FakeActor()]
    source = _HintedSource(3, slow=2)
    chunker = Chunker(s, actors, generation=1, chunk=3, ready=source.ready)
    plans = plan_batches(before_each(source, chunker.before_pull), batch_size=10)
    t = threading.Thread(target=plan_loop, args=(s, plans, chunker))
    t.start()
    try:
        assert source.waiting.wait(30)
        submitted = sorted(i for a in actors for c in a.calls for i in c)
        assert submitted == list(range(20))  # nothing held back by the slow pull
    finally:
        source.go.set()
        t.join(30)
    calls = [c for a in actors for c in a.calls]
    assert sorted(i for c in calls for i in c) == list(range(30))
    # Ramp 1+2, full chunks across the first boundary, 2 left before the slow pull, the
    # third block's 10 plans in full chunks and the last one at the end.
    assert sorted(len(c) for c in calls) == sorted([1, 2] + [3] * 5 + [2] + [3] * 3 + [1])
