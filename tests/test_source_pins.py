"""Pins the Ray internals that pipeline/source.py relies on (see its docstring).

If a Ray upgrade breaks one of these, it fails here, in one place, with the name of
the internal that moved.
"""

from __future__ import annotations

import inspect
import time

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")


def test_data_iterator_ref_bundle_protocol():
    import ray
    from ray.data import DataIterator

    assert hasattr(DataIterator, "_to_ref_bundle_iterator"), (
        "DataIterator._to_ref_bundle_iterator moved"
    )
    assert hasattr(DataIterator, "_on_iteration_end"), "DataIterator._on_iteration_end moved"
    assert list(inspect.signature(DataIterator._on_iteration_end).parameters) == [
        "self",
        "executor",
    ]
    it = ray.data.range(10, override_num_blocks=2).iterator()
    bundles, _stats, executor = it._to_ref_bundle_iterator()
    try:
        bundle = next(iter(bundles))
        entry = bundle.blocks[0]
        assert isinstance(entry.ref, ray.ObjectRef)
        assert entry.metadata.num_rows == 5 and entry.metadata.size_bytes > 0
        assert bundle.slices is None or len(bundle.slices) == len(bundle.blocks)
    finally:
        it._on_iteration_end(executor)


def test_block_slice_fields():
    from ray.data._internal.execution.interfaces.ref_bundle import BlockSlice

    s = BlockSlice(start_offset=2, end_offset=5)
    assert (s.start_offset, s.end_offset) == (2, 5)


def test_meta_count_and_copy():
    import ray
    from ray.data import Dataset

    ds = ray.data.range(123)
    assert ds._meta_count() == 123
    assert ds.filter(lambda r: True)._meta_count() is None  # unknown without executing
    cp = Dataset.copy(ds, _deep_copy=True)
    cp.context.execution_options.preserve_order = not ds.context.execution_options.preserve_order
    assert cp.context is not ds.context  # the caller's dataset is not mutated


def test_wait_rejects_duplicate_refs_so_prefetch_dedupes():
    import ray

    ref = ray.put(1)
    with pytest.raises(Exception):  # noqa: B017 - Ray's error type differs across versions
        ray.wait([ref, ref], num_returns=2, timeout=0)


def test_early_stop_leaves_the_callers_row_count_alone():
    """Ray caches the rows seen on any StopIteration, including an early-stopped epoch's;
    we iterate an epoch-private copy, so the caller's count survives many early stops."""
    import ray

    import torch_raydata as trd

    ds = ray.data.range(1000, override_num_blocks=5)
    loader = trd.RayIterableDataset(ds, batch_size=32, shuffle_buffer_size=200, id_column="id")
    for _ in range(5):
        it = iter(loader)
        for _ in range(10):
            next(it)
        it.close()
        assert ds._meta_count() == 1000
        assert len(loader) == 32


def test_ends_in_map_tells_fusable_plans():
    import ray

    from torch_raydata.pipeline.source import RaySource

    assert RaySource(ray.data.range(10).map_batches(lambda b: b)).ends_in_map()
    assert RaySource(ray.data.range(10).filter(lambda r: True)).ends_in_map()
    assert RaySource(ray.data.range(10)).ends_in_map()  # a read task fuses a map too
    assert not RaySource(ray.data.range(10).materialize()).ends_in_map()
    assert not RaySource(ray.data.range(10).iterator()).ends_in_map()
    # An actor-pool map (AbstractMap.compute) runs an appended stage as a task of its own.
    assert not RaySource(ray.data.range(10).map_batches(_Identity, concurrency=1)).ends_in_map()


class _Identity:
    def __call__(self, batch):
        return batch


def test_materialized_dataset_is_served_from_cache_without_an_executor():
    """We iterate a MaterializedDataset directly (no per-epoch copy): Ray must serve its
    cached bundle without an executor, so an early stop cannot touch its row count."""
    import ray

    ds = ray.data.range(100, override_num_blocks=4).materialize()
    it = ds.iterator()
    bundles, _stats, executor = it._to_ref_bundle_iterator()
    try:
        next(iter(bundles))
    finally:
        it._on_iteration_end(executor)
    assert executor is None
    assert ds._meta_count() == 100


def test_ray_train_worker_check():
    from ray.train.utils import _in_ray_train_worker

    from torch_raydata.pipeline.source import ray_train_device

    assert _in_ray_train_worker() is False  # the test process is no Ray Train worker
    assert ray_train_device() is None


def test_materialized_dataset_hands_the_same_block_refs_every_epoch():
    """block_cache.BlockCache keys deserialized blocks by reference: a MaterializedDataset must
    hand the same ObjectRefs at every iteration (else the cache never hits and only its
    byte budget stops it from pinning more)."""
    import ray

    ds = ray.data.range(100, override_num_blocks=4).materialize()

    def refs() -> list:
        it = ds.iterator()
        bundles, _stats, executor = it._to_ref_bundle_iterator()
        try:
            return [entry.ref for bundle in bundles for entry in bundle.blocks]
        finally:
            it._on_iteration_end(executor)

    first, second = refs(), refs()
    assert len(first) == 4 and first == second


def test_job_table_shows_other_drivers_until_they_disconnect(ray_session):
    """``other_live_drivers`` reads the GCS job table (``ray._private.state.jobs()``): a
    driver connected to our cluster shows up, and its entry turns dead once it has
    disconnected (here: its process ends without calling ray.shutdown itself)."""
    import os
    import subprocess
    import sys
    import time

    import ray
    from ray._private import state

    from torch_raydata.pipeline.source import other_live_drivers

    own = ray.get_runtime_context().get_job_id()
    assert {"JobID", "DriverPid", "IsDead"} <= set(state.jobs()[0])
    assert own in {j["JobID"] for j in state.jobs()}
    assert other_live_drivers() == []
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    code = (
        f"import ray, sys; ray.init(address={address!r}, log_to_driver=False); "
        "print('connected', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "connected"
        assert [pid for _, pid in other_live_drivers()] == [proc.pid]
    finally:
        proc.stdin.close()  # the driver returns; Ray's atexit hook disconnects it
        proc.wait(timeout=60)
    deadline = time.monotonic() + 60  # a hang guard, not a timing claim
    while other_live_drivers():
        assert time.monotonic() < deadline, "the driver's job never turned dead"
        time.sleep(0.05)  # polls the GCS for the event (no subscription API)


def test_row_count_marks_of_logical_operators():
    """``source_listing.rows_of_listing`` trusts Ray's ``can_modify_num_rows`` marks (and
    recognises ``add_column``'s batch function by name); see tests/test_listed_rows.py."""
    import ray

    from torch_raydata.pipeline.source_listing import _ADD_COLUMN

    def last(ds):
        return ds._logical_plan.dag

    ds = ray.data.range(10)
    assert last(ds.map(lambda r: r)).can_modify_num_rows is False
    assert last(ds.select_columns(["id"])).can_modify_num_rows is False
    assert last(ds.map_batches(lambda b: b)).can_modify_num_rows is True
    assert last(ds.filter(lambda r: True)).can_modify_num_rows is True
    assert last(ds.flat_map(lambda r: [r])).can_modify_num_rows is True
    added = last(ds.add_column("z", lambda b: b["id"]))
    assert type(added).__name__ == "MapBatches" and added.per_block_limit is None
    assert (added.fn.__module__, added.fn.__qualname__) == _ADD_COLUMN, "add_column's fn moved"


def test_executor_internals_of_the_hold_and_the_quiet_teardown():
    """``EpochBlocks.start`` adds a backpressure policy and a step callback to Ray's
    executor; ``_quiesce`` reads ``_shutdown``, ``_topology`` (``num_active_tasks``),
    replaces ``_consumer_idling`` and relies on ``on_execution_step`` ending every step."""
    import ray

    from torch_raydata.pipeline.source import EpochBlocks

    ds = ray.data.range(400, override_num_blocks=8).map_batches(lambda b: b)
    blocks = EpochBlocks.start(ds, hold_bytes=None)
    executor, hold = blocks._executor, blocks._hold
    assert hold in executor._backpressure_policies
    assert hold.steps in executor._callbacks
    assert callable(executor._consumer_idling) and executor._shutdown is False
    assert all(callable(op.num_active_tasks) for op in executor._topology)
    assert isinstance(executor.is_alive(), bool)
    assert sum(sb.num_rows for sb in blocks) == 400
    assert hold.steps.count > 0  # Ray called on_execution_step for its steps
    assert hold.queued_bytes() >= 0
    blocks.close()
    assert executor._shutdown is True


def _slow_block(batch):
    import time

    time.sleep(0.3)  # the workload (inside the Ray task), not a test synchronization
    return batch


def test_closing_an_epoch_never_iterated_cancels_no_running_task(monkeypatch):
    """A prestarted epoch that is discarded was never iterated: our reference to Ray's
    output iterator is its only one, and dropping it shuts the executor down at once
    (``_ClosingIterator.__del__``), cancelling the running tasks (the cancel that can
    abort the process, see ``source_executor._quiesce``). ``close`` must quiesce first. Pins
    ``PhysicalOperator._cancel_active_tasks`` as the place Ray cancels."""
    import ray
    from ray.data._internal.execution.interfaces import physical_operator as po

    from torch_raydata.pipeline.source import EpochBlocks, teardown_counts

    cancelled: list = []
    cancel = po.PhysicalOperator._cancel_active_tasks

    def record(self, force):
        cancelled.extend(self.get_active_tasks())
        return cancel(self, force)

    monkeypatch.setattr(po.PhysicalOperator, "_cancel_active_tasks", record)
    ds = ray.data.range(40, override_num_blocks=8).map_batches(_slow_block, batch_size=None)
    blocks = EpochBlocks.start(ds, hold_bytes=None)
    topology = blocks._executor._topology
    deadline = time.monotonic() + 60  # detector, bounded: a task of this epoch runs
    while not any(op.num_active_tasks() for op in list(topology)):
        assert time.monotonic() < deadline, "no task of the started epoch ever ran"
        time.sleep(0.01)
    before = teardown_counts()
    blocks.close()
    assert cancelled == []
    assert teardown_counts()["quiet"] == before["quiet"] + 1


def test_executor_limits_are_the_clusters_from_the_first_step():
    """Ray 2.60 sizes an executor's limits from its autoscaling coordinator's reservation
    (``ResourceManager._get_total_resources``), empty at the executor's start and split
    between two executors; ``source_executor._size_to_cluster`` makes each limit at least the
    cluster's. Pins ``_resource_manager``, ``_get_total_resources``,
    ``_global_limits_last_update_time`` and ``get_global_limits``."""
    import ray

    from torch_raydata.pipeline.source import EpochBlocks

    cpus = ray.cluster_resources()["CPU"]
    ds = ray.data.range(400, override_num_blocks=8).map_batches(lambda b: b)
    first = EpochBlocks.start(ds, hold_bytes=0)
    second = EpochBlocks.start(ds, hold_bytes=None)  # two executors at once
    try:
        for blocks in (first, second):
            manager = blocks._executor._resource_manager
            assert callable(manager._get_total_resources)
            assert hasattr(manager, "_global_limits_last_update_time")
            limits = manager.get_global_limits()
            assert limits.cpu == cpus, limits
            assert limits.object_store_memory > 0, limits
        assert sum(sb.num_rows for sb in second) == 400
    finally:
        first.close()
        second.close()


def test_a_held_epoch_does_not_spin_rays_scheduling_loop(monkeypatch):
    """With no task running Ray's loop does not wait (``process_completed_tasks`` waits
    only on running tasks); ``_Hold.pace`` pauses such steps. Pins ``get_active_tasks``
    and that our step callback runs at the end of every step."""
    import threading

    import ray

    from torch_raydata.pipeline import source_executor
    from torch_raydata.pipeline.source import EpochBlocks

    monkeypatch.setattr(source_executor, "IDLE_STEP_WAIT", 0.005)
    paused: list[int] = []

    class Counting(threading.Condition):
        def wait(self, timeout=None):
            paused.append(1)
            return super().wait(timeout)

    ds = ray.data.range(400, override_num_blocks=8).map_batches(lambda b: b)
    blocks = EpochBlocks.start(ds, hold_bytes=1)  # held after its first output
    executor, hold = blocks._executor, blocks._hold
    hold._wake = Counting()
    steps = hold.steps
    try:
        with steps.cond:  # detector, bounded: the held executor's tasks have all ended
            for _ in range(6000):
                idle = not any(op.get_active_tasks() for op in list(executor._topology))
                if idle and hold.queued_bytes() > 0:
                    break
                steps.cond.wait(0.01)
            else:
                raise AssertionError("the held epoch never went idle")
            start, paused_at_start = steps.count, len(paused)
            while steps.count < start + 20:
                assert steps.cond.wait(30), "Ray's scheduling loop stopped stepping"
        assert len(paused) - paused_at_start >= 19  # every idle step paused (one may race)
        assert executor.is_alive()  # still held: the loop runs, slowly
        blocks.release()
        assert sum(sb.num_rows for sb in blocks) == 400
    finally:
        blocks.close()
