"""Faults on the cluster side of the stream, on a small local Ray: a ``map_batches`` task
that fails transiently (Ray retries it: no row lost or repeated), one that fails for good
(a clear error, no hang), and a preprocessing actor that dies (Ray restarts it).

Fail-once is decided by a marker file per block (first row ID) in a temporary
directory, so a retry in another worker process sees that the first attempt happened.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import torch_raydata as trd

from ._probes import Snapshot, join_trd_threads

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]

ROWS, BLOCKS = 2000, 5


def _once(marker_dir: str, key: object) -> bool:
    """True the first time ``key`` is seen under ``marker_dir`` (across processes)."""
    try:
        fd = os.open(os.path.join(marker_dir, f"seen-{key}"), os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _epoch_ids(ds) -> np.ndarray:
    loader = trd.RayIterableDataset(ds, batch_size=64, num_workers=2)
    return np.concatenate([b["id"].numpy() for b in loader])


@pytest.mark.parametrize("retry_by", ["data_context", "task_retries"])
def test_transient_map_task_failure_is_retried_and_no_row_is_lost_or_repeated(
    tmp_path, retry_by
):
    import ray

    marker_dir = str(tmp_path)

    def flaky(batch):
        first = int(batch["id"][0])
        if _once(marker_dir, first):
            raise RuntimeError(f"transient failure on the block starting at row {first}")
        return batch

    if retry_by == "data_context":  # Ray Data retries the UDF inside the task
        ds = ray.data.range(ROWS, override_num_blocks=BLOCKS).map_batches(flaky, batch_size=None)
        ds.context.max_map_retries = 2
        ds.context.retried_map_errors = ["transient failure"]
    else:  # Ray Core retries the whole task (max_retries, retry_exceptions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # ray_remote_args, Ray 2.60
            ds = ray.data.range(ROWS, override_num_blocks=BLOCKS).map_batches(
                flaky, batch_size=None, max_retries=3, retry_exceptions=True
            )
    snap = Snapshot()
    ids = _epoch_ids(ds)
    assert len(ids) == ROWS and np.array_equal(np.sort(ids), np.arange(ROWS))
    # Every block failed once and was retried.
    assert len(os.listdir(marker_dir)) == BLOCKS
    snap.check()


def test_map_task_that_keeps_failing_gives_a_clear_error_not_a_hang():
    import ray

    def broken(batch):
        if int(batch["id"][0]) >= ROWS // 2:
            raise ZeroDivisionError("the preprocessing of this block is broken")
        return batch

    ds = ray.data.range(ROWS, override_num_blocks=BLOCKS).map_batches(broken, batch_size=None)
    loader = trd.RayIterableDataset(ds, batch_size=64, num_workers=2)
    snap = Snapshot()
    with pytest.raises(Exception) as ei:  # Ray's error type; the UDF's message inside
        for _ in loader:
            pass
    assert "the preprocessing of this block is broken" in str(ei.value)
    assert "stage 2 (prefetch)" in "\n".join(getattr(ei.value, "__notes__", []))
    assert join_trd_threads(within=1.0) == []
    del ei
    snap.check()


def test_preprocessing_actor_that_dies_is_restarted_and_the_epoch_completes(tmp_path):
    """Outcome in Ray 2.60: the actor pool restarts the dead actor and resubmits its task,
    so the epoch completes with every row exactly once (no error surfaces)."""
    import ray
    from ray.data import ActorPoolStrategy

    marker_dir = str(tmp_path)

    class DiesOnce:
        def __call__(self, batch):
            if int(batch["id"][0]) >= ROWS // 2 and _once(marker_dir, "died"):
                os._exit(1)  # the worker process dies, mid-task
            return batch

    ds = ray.data.range(ROWS, override_num_blocks=BLOCKS).map_batches(
        DiesOnce, batch_size=None, compute=ActorPoolStrategy(size=1)
    )
    snap = Snapshot()
    ids = _epoch_ids(ds)
    assert os.path.exists(os.path.join(marker_dir, "seen-died"))  # it did die
    assert len(ids) == ROWS and np.array_equal(np.sort(ids), np.arange(ROWS))
    snap.check()  # and the pool's actors are gone once the epoch ends


def test_actor_pool_is_released_when_the_consumer_breaks():
    import ray
    from ray.data import ActorPoolStrategy

    class Identity:
        def __call__(self, batch):
            return batch

    ds = ray.data.range(ROWS, override_num_blocks=BLOCKS * 4).map_batches(
        Identity, batch_size=None, compute=ActorPoolStrategy(size=1)
    )
    loader = trd.RayIterableDataset(ds, batch_size=16, num_workers=2)
    snap = Snapshot()
    for i, _ in enumerate(loader):
        if i == 2:
            break
    report = snap.check(dataset=loader)  # its prestarted next epoch may hold a pool too
    assert report["new_actors_alive"] == 0
