"""Real CUDA: the device transports on a GPU (every test is marked ``gpu``; skipped without
CUDA). Run them all with ``make test-gpu``. See docs/gpu.md for what the CPU fakes
already check and what only these can.

Each test can fail: copies are made late on purpose (``torch.cuda._sleep`` on the copy
stream), the step's kernels are queued behind long ones on its stream, batches are
dropped without a sync, and buffers are reused under a small pinned budget, so a missing
wait, ``record_stream`` or event-gated release shows as a wrong checksum.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

import torch_raydata as trd
from torch_raydata.collate import DefaultCollate, PadCollate
from torch_raydata.pipeline.finalize import Finalizer
from torch_raydata.pipeline.run import EpochRun, PipelineConfig
from torch_raydata.pipeline.types import Batch
from torch_raydata.transports import CudaTransport, NixlTransport

from .fakes import make_blocks, source_of

pytestmark = pytest.mark.gpu

ELEMS = 1 << 18  # float32 values per batch: 1 MiB
SPIN = 20_000_000  # torch.cuda._sleep cycles: ~10 ms on current GPUs


def _late(t):
    """The next copies start late: the copy stream is busy first."""
    with torch.cuda.stream(t.copy_stream):
        torch.cuda._sleep(SPIN)


def _batches(t, n, elems=ELEMS, late=False):
    """Batches of distinct values, collated into the transport's staging memory (on the
    finalize thread, as the pipeline's collate would); ``late``: each copy starts late."""
    for i in range(n):
        x = t.host_allocator((elems,), torch.float32)
        x.fill_(i)
        if late:
            _late(t)
        yield Batch(idx=i, data={"x": x}, num_rows=elems, nbytes=4 * elems)


def _check(sums, elems=ELEMS):
    torch.cuda.synchronize()
    got = [float(s) for s in sums]
    assert got == [float(i * elems) for i in range(len(sums))], got


def _run(t, tables, collate=None, **cfg):
    blocks, fetcher = source_of(tables)
    config = PipelineConfig(**{"batch_size": 64, "num_workers": 2, "prefetch_batches": 4, **cfg})
    collate = collate or DefaultCollate(allocator=t.host_allocator)
    return EpochRun(blocks, fetcher, collate, t, config)


def test_delayed_copies_read_right_after_on_consume_without_sync():
    t = CudaTransport("cuda")
    sums = []
    for b in _batches(t, 8, late=True):
        (dev,) = t.wait_fetch_complete(t.fetch_multiple([b.data]))
        sums.append(t.on_consume(dev)["x"].sum())  # queued at once, no sync
        del b, dev
    _check(sums)
    t.close()


def test_batches_dropped_behind_gpu_work_keep_their_memory():
    t = CudaTransport("cuda")
    f = Finalizer(_batches(t, 32), t, in_flight=4)
    sums = []
    for b in f:
        data = t.on_consume(b.data)
        torch.cuda._sleep(SPIN)  # the step's earlier kernels
        sums.append(data["x"].sum())  # then one reading the batch; dropped without sync
        del b, data
    f.close()
    _check(sums)
    t.close()


def test_256_distinct_batches_through_a_tiny_pinned_budget():
    t = CudaTransport("cuda", max_pinned_bytes=2 * 4 * ELEMS)
    f = Finalizer(_batches(t, 256), t, in_flight=4)
    sums, exact = [], []
    for i, b in enumerate(f):
        data = t.on_consume(b.data)
        sums.append(data["x"].sum())
        exact.append((data["x"] == i).all())
        if i % 16 == 0:
            _late(t)
        del b, data
    f.close()
    _check(sums)
    assert all(bool(e) for e in exact)
    st = t.memory_stats()
    assert st.pinned_bytes_reserved <= 2 * 4 * ELEMS
    assert st.pageable_fallbacks.get("budget", 0) > 0
    t.close()


def test_iteration_inside_a_non_default_stream():
    t = CudaTransport("cuda")
    side = torch.cuda.Stream()
    f = Finalizer(_batches(t, 24, late=True), t, in_flight=4)
    sums = []
    with torch.cuda.stream(side):
        for b in f:
            data = t.on_consume(b.data)  # `side` (not the default stream) must wait
            sums.append(data["x"].sum())
            torch.cuda._sleep(SPIN)  # and stays busy while the batch is dropped
            del b, data
    f.close()
    _check(sums)
    t.close()


def test_everything_forced_to_pageable_memory():
    t = CudaTransport("cuda", max_pinned_bytes=0)
    f = Finalizer(_batches(t, 16), t, in_flight=4)
    sums = []
    for b in f:
        sums.append(t.on_consume(b.data)["x"].sum())
        del b
    f.close()
    _check(sums)
    st = t.memory_stats()
    assert st.pinned_bytes_reserved == 0 and st.pageable_fallbacks == {"budget": 16}
    t.close()


def test_repeated_early_break_returns_pinned_bytes_to_baseline():
    t = CudaTransport("cuda")
    tables = make_blocks([512] * 40)
    reserved = []
    for _ in range(5):
        run = _run(t, tables)
        for i, batch in enumerate(run):
            assert batch["x"].is_cuda
            if i == 2:
                break
        run.close()
        del run, batch
        gc.collect()
        torch.cuda.synchronize()
        st = t.memory_stats()
        assert st.pinned_bytes_in_use == 0, st
        reserved.append(st.pinned_bytes_reserved)
    assert len(set(reserved[1:])) == 1, reserved  # reused, not growing
    assert t.memory_stats().pageable_fallbacks == {}
    t.close()
    assert t.memory_stats().pinned_bytes_reserved == 0


def test_close_during_a_slow_copy():
    t = CudaTransport("cuda")
    host = t.host_allocator((64 << 20,), torch.uint8)
    host.fill_(7)
    with torch.cuda.stream(t.copy_stream):
        torch.cuda._sleep(20 * SPIN)
    (dev,) = t.wait_fetch_complete(t.fetch_multiple([{"x": host}]))
    dev = t.on_consume(dev)
    del host
    t.close()  # waits for the copy before dropping its staging buffer
    assert t.copy_stream.query()  # the copy had completed when close() returned
    assert t.memory_stats().pinned_bytes_reserved == 0
    assert int(dev["x"].sum()) == 7 * (64 << 20)


@pytest.mark.timeout(120)
def test_forced_out_of_memory_reaches_the_step_and_close_does_not_hang():
    t = CudaTransport("cuda")
    width = 4096  # float32 per row: 16 KiB, 1 MiB per batch of 64
    values = pa.array(np.ones(64 * 8 * width, dtype=np.float32))
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(values, width)})
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(t.device).total_memory
    torch.cuda.set_per_process_memory_fraction(
        (torch.cuda.memory_allocated(t.device) + (256 << 10)) / total, t.device
    )
    try:
        run = _run(t, [table])
        with pytest.raises(torch.OutOfMemoryError) as info:
            for _ in run:
                pass
        where = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
        assert "stage 6 (finalize)" in where, where
        run.close()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, t.device)
    t.close()
    assert t.memory_stats().pinned_bytes_reserved == 0


def test_pad_collate_variable_widths():
    t = CudaTransport("cuda", max_pinned_bytes=64 << 20)
    rng = np.random.default_rng(0)
    tables = []
    for b in range(12):
        lengths = rng.integers(1, 300, size=100)
        tok = [list(range(b * 1000 + k, b * 1000 + k + n)) for k, n in enumerate(lengths)]
        tables.append(pa.table({"tok": tok, "id": np.arange(b * 100, b * 100 + 100)}))
    pad = PadCollate(["tok"], pad_value=-1, dtypes={"tok": torch.int64}, allocator=t.host_allocator)
    plain = PadCollate(["tok"], pad_value=-1, dtypes={"tok": torch.int64})
    run = _run(t, tables, collate=pad, batch_size=100, preserve_order=True)
    for table, batch in zip(tables, run, strict=True):
        torch.cuda._sleep(SPIN)
        want = plain(table)
        for k in want:
            if isinstance(want[k], torch.Tensor):
                assert torch.equal(batch[k].cpu(), want[k]), k
    run.close()
    assert t.memory_stats().pageable_fallbacks == {}
    t.close()


def test_two_datasets_share_one_transport():
    t = CudaTransport("cuda", max_pinned_bytes=8 << 20)
    errors = []

    def epoch(start):
        try:
            tables = make_blocks([256] * 20, start=start)
            ids = []
            run = _run(t, tables, preserve_order=True)
            for batch in run:
                torch.cuda._sleep(SPIN // 4)
                ids.append(batch["id"].clone())
            run.close()
            got = torch.cat(ids).cpu()
            assert torch.equal(got, torch.arange(start, start + 256 * 20)), start
        except BaseException as e:  # noqa: BLE001 - reported on the test's thread
            errors.append(e)

    threads = [
        threading.Thread(target=epoch, args=(s,), name=f"trd-test-share-{s}") for s in (0, 10**6)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    t.close()


def _busy_stream_batches(t, collate, late_stream, n=40):
    """``n`` batches through ``t`` while the step keeps the default stream busy and every
    other batch's copies start late; returns each batch's "id" sum (on the device)."""
    sums = []
    for i in range(n):
        torch.cuda._sleep(SPIN)  # the step keeps the default stream busy
        if i % 2:
            with torch.cuda.stream(late_stream):
                torch.cuda._sleep(SPIN)  # and this batch's copies start late
        (batch,) = t.wait_fetch_complete(t.fetch_multiple([collate(i)]))
        batch = t.on_consume(batch)
        assert batch["id"].is_cuda
        sums.append(batch["id"].sum())
        del batch
    torch.cuda.synchronize()
    return [int(s) for s in sums]


def test_nixl_to_vram_with_a_busy_default_stream():
    from torch_raydata.transports.nixl.worker import CollateWorker

    from .test_transport_nixl import _Plan, _table

    worker = CollateWorker("trd-gpu-worker", DefaultCollate(), id_column="id", max_slabs=6)
    t = NixlTransport("cuda", in_flight=2)
    try:
        collate = lambda i: worker.collate(_Plan(i, _table(256, 256 * i)))  # noqa: E731
        sums = _busy_stream_batches(t, collate, t.copy_stream)
        assert sums == [sum(range(256 * i, 256 * i + 256)) for i in range(40)]
        assert t.pool.registered < 40  # buffers were reused (after their clones)
    finally:
        t.close()
        worker.close()


def test_shm_to_cuda_with_late_copies_and_slabs_reused_at_once():
    """transport='shm' on a GPU: each batch is copied out of its shared-memory slab
    (pageable) and the slab goes back at once; late copies and a busy default stream must
    still see each batch's own bytes."""
    from torch_raydata.transports import ShmTransport
    from torch_raydata.transports.shm.worker import ShmCollateWorker

    from .test_transport_shm import _Plan, _table

    worker = ShmCollateWorker("trd-gpu-shm", DefaultCollate(), max_slabs=2)
    t = ShmTransport("cuda")
    try:
        collate = lambda i: worker.collate(_Plan(i, _table(i)), 1)  # noqa: E731
        assert _busy_stream_batches(t, collate, t._cuda.copy_stream) == [64 * i for i in range(40)]
        assert worker.allocations == 1  # one slab served every batch
    finally:
        t.close()
        worker.close()


def test_gpu_bytes_equal_after_transfer_through_ray(ray_session):
    import ray

    ds = ray.data.range(4096).map_batches(lambda b: {"id": b["id"], "f": b["id"].astype("float32")})
    loader = trd.RayIterableDataset(ds, batch_size=512, device="cuda", preserve_order=True)
    out = [b for b in loader]
    assert all(b["f"].is_cuda for b in out)
    assert torch.equal(torch.cat([b["id"] for b in out]).cpu(), torch.arange(4096))
    st = loader.stats()
    assert st.pinned_bytes_reserved > 0 and st.pageable_fallbacks == {}
    loader.close()


def test_copy_overlaps_compute():
    """Detector, not stopwatch: the copy's interval intersects a kernel's interval."""
    t = CudaTransport("cuda")
    host = t.host_allocator((64 << 20,), torch.uint8)
    x = torch.randn(4096, 4096, device=t.device)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    ev[0].record()
    for _ in range(20):
        x = x @ x
        x = x / x.norm()
    ev[1].record()
    ev[2].record(t.copy_stream)
    (dev,) = t.wait_fetch_complete(t.fetch_multiple([{"h": host}]))
    ev[3].record(t.copy_stream)
    torch.cuda.synchronize()
    k1 = ev[0].elapsed_time(ev[1])
    c0, c1 = ev[0].elapsed_time(ev[2]), ev[0].elapsed_time(ev[3])
    assert c0 < k1 and c1 > 0, (k1, c0, c1)
    t.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_pinning_on_a_collate_thread_makes_no_context_on_gpu0():
    code = """
import threading, torch
from torch_raydata.transports import CudaTransport
t = CudaTransport("cuda:1")
th = threading.Thread(target=lambda: t.host_allocator((1 << 20,), torch.uint8))
th.start(); th.join()
print(torch._C._cuda_hasPrimaryContext(0), torch._C._cuda_hasPrimaryContext(1))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr
