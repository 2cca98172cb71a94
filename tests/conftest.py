"""Shared fixtures: one small local Ray per session, a thread-leak detector, GPU marker."""

from __future__ import annotations

import logging
import os
import threading

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Threads that outlive a test by design: Ray's own per-process helpers (started once, at
# ray.init or on first use of the Ray Data executor) and torch's/Python's pools.
_ALLOWED_PREFIXES = (
    "ray_",
    "Thread-",  # anonymous threads of libraries (Ray's log monitor etc.); ours are all named trd-*
    "PythonGCThread",
    "pydevd",
    "ThreadPoolExecutor",
    "asyncio",
    "StreamingExecutor",
    # Ray's helper of a StreamingExecutor; ours run under a dataset's prestarted next
    # epoch until the dataset is closed or collected (tests/test_prestart.py checks that).
    "ray-data-metadata-prefetch",
    "event_loop",
    "MetricsPusher",
)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """``ray.init(num_cpus=2)`` once for the whole session (about 3 s here)."""
    import ray

    if not ray.is_initialized():
        # address="local": never join another cluster this machine may have running.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def rows(ray_session):
    """3,300 rows in 7 blocks, materialized once per module (the remote-collate tests:
    every loader there reads the same blocks)."""
    import numpy as np

    def fmt(b):
        ids = b["id"]
        return {
            "id": ids,
            "x": (ids * 0.5).astype(np.float32),
            "img": (ids[:, None, None] % 251 + np.zeros((1, 3, 8), np.int64)).astype(np.uint8),
            "label": np.array([f"r{i}" for i in ids]),
        }

    return ray_session.data.range(3300, override_num_blocks=7).map_batches(fmt).materialize()


@pytest.fixture(autouse=True)
def no_leaked_threads(request):
    """Fail a test that leaves one of its threads running (torch_raydata's are named trd-*).

    Threads are joined, not slept on: a pipeline thread must already be stopping when the
    iterator that made it is closed, so a short join is all it may need.
    """
    before = set(threading.enumerate())
    yield
    leaked = []
    for t in threading.enumerate():
        if t in before or not t.is_alive() or isinstance(t, threading._DummyThread):
            continue  # a _DummyThread is a foreign (e.g. Ray's C++) thread: not ours, unjoinable
        if not t.name.startswith("trd-") and t.name.startswith(_ALLOWED_PREFIXES):
            continue
        t.join(timeout=2.0)
        if t.is_alive():
            leaked.append(t)
    if leaked:
        pytest.fail(f"Test left zombie thread(s): {[t.name for t in leaked]}")
