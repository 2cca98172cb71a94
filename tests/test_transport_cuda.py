"""CudaTransport on CPU through an adversarial fake GPU (``tests/fake_cuda.py``).

The fake's copies complete late, when a test pumps them; its consumer-side reads run as
soon as nothing blocks their stream; its caching allocator reuses device memory like
CUDA's. Each test below fails when one piece of the stream protocol is removed (the
removal each one catches is named in its docstring). Real CUDA: ``tests/test_gpu.py``.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

import torch_raydata as trd
from torch_raydata.collate import DefaultCollate
from torch_raydata.memory.pinned import size_class
from torch_raydata.pipeline.finalize import Finalizer
from torch_raydata.pipeline.run import EpochRun, PipelineConfig
from torch_raydata.pipeline.types import Batch
from torch_raydata.transports import CudaTransport, resolve_transport

from .fake_cuda import FakeGPU
from .fakes import make_blocks, source_of

N = 4096  # int64 values per test batch: 32 KiB, one size class


def _transport(max_pinned=1 << 30, gpu=None):
    gpu = gpu or FakeGPU()
    return CudaTransport("cuda:0", ops=gpu, max_pinned_bytes=max_pinned), gpu


def _collated(t, value, n=N):
    x = t.host_allocator((n,), torch.int64)
    x.fill_(value)
    return {"x": x}


def _post(t, payload):
    (dev,) = t.wait_fetch_complete(t.fetch_multiple([payload]))
    return dev


def test_device_index_fixed_at_construction_and_cpu_rejected():
    t, _ = _transport()
    assert t.device == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CudaTransport("cpu")
    with pytest.raises(ValueError, match="max_pinned_bytes=-1"):
        CudaTransport("cuda:0", ops=FakeGPU(), max_pinned_bytes=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_no_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        CudaTransport("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_transport("auto", "cuda")


# -- the stream protocol, each piece caught by a test -------------------------------------


def test_step_reads_after_on_consume_see_the_copied_bytes():
    """Removal caught: the consumer stream's wait on the batch's event (on_consume)."""
    t, gpu = _transport()
    probes = []
    for i in range(3):
        dev = t.on_consume(_post(t, _collated(t, i)))
        probes.append(gpu.read(dev["x"]))  # the step's kernel, queued right after
    assert all(p.value is None for p in probes)  # the reads wait for the late copies
    gpu.pump()
    for i, p in enumerate(probes):
        assert p.value is not None and (p.value == i).all(), i


def test_batch_dropped_behind_gpu_work_is_not_overwritten_by_the_next_copy():
    """Removal caught: record_stream of the device tensors on the consumer's stream."""
    t, gpu = _transport()
    dev = t.on_consume(_post(t, _collated(t, 1)))
    gpu.pump()
    gate = gpu.busy()  # the step's long kernel ...
    probe = gpu.read(dev["x"])  # ... then one reading the batch; the step drops it, no sync
    del dev
    nxt = _post(t, _collated(t, 2))  # the next copy needs device memory of the same size
    gpu.pump()  # and runs while the step's kernels are still queued
    gpu.open(gate)
    assert probe.value is not None and (probe.value == 1).all()
    assert (t.on_consume(nxt)["x"] == 2).all()


def test_staging_buffer_is_not_reused_before_its_copy_ran():
    """Removal caught: the event-gated release of pinned staging buffers."""
    t, gpu = _transport()
    first = t.on_consume(_post(t, _collated(t, 7)))  # the copy is posted, not yet run
    gc.collect()  # the host batch is gone: only the copy event holds its buffer now
    second = _collated(t, 8)  # collate of the next batch must not write into it
    assert t.pinned_pool.owns(second["x"]) is not None
    gpu.pump()
    assert (gpu.read(first["x"]).value == 7).all()
    third = _collated(t, 9)  # the copy ran: its buffer is reused now
    assert t.pinned_pool.reserved_bytes == 2 * size_class(N * 8)
    del second, third


def test_concurrent_reclaims_never_hand_one_buffer_out_twice():
    """Removal caught: the lock around the pool's reclaim (leased/draining/free moves).

    Two collate threads allocate while a buffer's copy completes. The fake's ``done()``
    holds the first thread inside the reclaim until a second thread arrives there too
    (a barrier; with the lock the second can never arrive, and the first goes on after
    the barrier's deadline)."""
    t, gpu = _transport()
    dev = _post(t, _collated(t, 1))
    gc.collect()  # buffer returned, its copy pending
    gpu.pump()  # the copy is done; the next reclaim frees the buffer
    inside = threading.Event()
    barrier = threading.Barrier(2, timeout=2.0)

    def hold(event):
        if barrier.n_waiting == 0 and not barrier.broken:
            inside.set()
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass

    gpu.done_hook = hold
    got, errors = {}, []

    def collate(name):
        try:
            got[name] = _collated(t, 0)["x"]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    a = threading.Thread(target=collate, args=("a",), name="trd-test-a")
    b = threading.Thread(target=collate, args=("b",), name="trd-test-b")
    a.start()
    assert inside.wait(10)
    b.start()
    a.join(10)
    b.join(10)
    gpu.done_hook = None
    assert not errors, errors
    assert got["a"].data_ptr() != got["b"].data_ptr()  # never the same buffer twice
    del dev


def test_waits_and_records_happen_on_the_consumer_thread():
    waits, records, copies = [], [], []

    class Recording(FakeGPU):
        def wait(self, stream, event):
            waits.append(threading.get_ident())
            super().wait(stream, event)

        def record_stream(self, tensor, stream):
            records.append(threading.get_ident())
            super().record_stream(tensor, stream)

        def copy(self, host, stream):
            copies.append(threading.get_ident())
            return super().copy(host, stream)

    t, gpu = _transport(gpu=Recording())
    batches = [Batch(idx=i, data=_collated(t, i), num_rows=N, nbytes=8 * N) for i in range(6)]
    f = Finalizer(iter(batches), t, in_flight=3)
    del batches
    probes = [gpu.read(t.on_consume(b.data)["x"]) for b in f]
    f.close()
    gpu.pump()
    assert [int(p.value[0]) for p in probes] == list(range(6))
    consumer = threading.get_ident()
    assert waits == [consumer] * 6 and set(records) == {consumer}
    assert consumer not in copies  # posted from the finalize thread


def test_many_batches_through_a_tiny_budget_with_late_copies():
    """Removals caught: any of the above, under threads and buffer reuse (200 batches,
    a budget of two staging buffers, copies run only every third batch)."""
    t, gpu = _transport(max_pinned=2 * size_class(N * 8))

    def batches():
        for i in range(200):
            yield Batch(idx=i, data=_collated(t, i), num_rows=N, nbytes=8 * N)

    f = Finalizer(batches(), t, in_flight=4)
    probes = []
    for n, b in enumerate(f):
        probes.append(gpu.read(t.on_consume(b.data)["x"]))
        del b
        if n % 3 == 2:
            gpu.pump()
    f.close()
    gpu.pump()
    assert [int(p.value.min()) for p in probes] == list(range(200))
    assert [int(p.value.max()) for p in probes] == list(range(200))
    st = t.memory_stats()
    assert st.pinned_bytes_reserved <= 2 * size_class(N * 8)
    assert st.pageable_fallbacks.get("budget", 0) > 0  # some went pageable, and were right


# -- pool: early stops, sizes, failures, close ------------------------------------------------


def test_batches_collated_but_never_copied_return_their_buffers():
    t, gpu = _transport()
    tables = make_blocks([64] * 40)
    for _ in range(3):  # a few early stops in a row
        blocks, fetcher = source_of(tables)
        cfg = PipelineConfig(batch_size=32, num_workers=2, prefetch_batches=4)
        run = EpochRun(blocks, fetcher, DefaultCollate(allocator=t.host_allocator), t, cfg)
        for i, _batch in enumerate(run):
            gpu.pump()
            if i == 2:
                break
        run.close()
        del run, _batch
        gc.collect()
        gpu.pump()
        assert t.memory_stats().pinned_bytes_in_use == 0  # nothing leaked by the break
    assert sum(t.memory_stats().pageable_fallbacks.values()) == 0


def test_size_classes_are_powers_of_two_and_budget_evicts_unused_classes():
    assert [size_class(n) for n in (1, 4096, 4097, 5000, 1 << 20)] == [
        4096, 4096, 8192, 8192, 1 << 20,
    ]
    budget = size_class(48_000)
    t, gpu = _transport(max_pinned=budget)
    widths = [100, 130, 3000, 3100, 100, 3000, 6000, 100]  # int64 values: 800 B to 48 KB
    for w in widths:  # PadCollate-like: a new width each batch
        x = t.host_allocator((w,), torch.int64)
        x.fill_(w)
        dev = t.on_consume(_post(t, {"x": x}))
        del x
        gpu.pump()
        assert (gpu.read(dev["x"]).value == w).all()
        assert t.pinned_pool.reserved_bytes <= budget
    assert t.pinned_pool.evictions > 0 and gpu.host_cache_emptied > 0
    assert t.memory_stats().pageable_fallbacks == {}  # evicting made room every time


def test_failed_pinning_falls_back_and_frees_its_budget():
    t, gpu = _transport(max_pinned=size_class(N * 8))
    gpu.fail_pinning = True
    x = _collated(t, 3)["x"]
    assert t.pinned_pool.owns(x) is None and t.pinned_pool.reserved_bytes == 0
    gpu.fail_pinning = False
    y = _collated(t, 4)["x"]  # the budget was given back: this one is pinned
    assert t.pinned_pool.owns(y) is not None
    dev = t.on_consume(_post(t, {"x": x}))
    gpu.pump()
    assert (gpu.read(dev["x"]).value == 3).all()
    assert t.memory_stats().pageable_fallbacks == {"pin_failed": 1}


def test_stats_report_pinned_bytes_and_fallbacks_by_reason():
    t, gpu = _transport(max_pinned=size_class(N * 8))
    a = _collated(t, 1)
    b = _collated(t, 2)  # over the budget: pageable
    st = t.memory_stats()
    assert st.pinned_bytes_in_use == st.pinned_bytes_reserved == size_class(N * 8)
    assert st.pageable_fallbacks == {"budget": 1}
    devs = [_post(t, a), _post(t, b), _post(t, {"y": torch.ones(10)})]  # y: not staged
    del a, b
    gc.collect()
    assert t.memory_stats().pinned_bytes_in_use == size_class(N * 8)  # copy not run yet
    gpu.pump()
    st = t.memory_stats()
    assert st.pinned_bytes_in_use == 0 and st.pinned_bytes_reserved == size_class(N * 8)
    assert st.pageable_fallbacks == {"budget": 1, "not_staged": 1}
    from torch_raydata.pipeline.stats import StatsRecorder

    snap = StatsRecorder().snapshot(0.0)
    import dataclasses

    text = str(dataclasses.replace(snap, pinned_bytes_reserved=4096, pageable_fallbacks={"budget": 1}))
    assert "pinned staging: 0 B in use of 4,096 B pinned; pageable fallbacks: budget=1" in text
    del devs


def test_events_of_payloads_never_consumed_are_dropped():
    t, gpu = _transport()
    payloads = [_post(t, _collated(t, i)) for i in range(5)]
    assert len(t._handoff) == 5
    t.on_consume(payloads[0])
    assert len(t._handoff) == 4
    del payloads  # skipped, drained at a break, or dropped after an error
    gc.collect()
    assert len(t._handoff) == 0


def test_close_waits_for_copies_unpins_and_stays_usable():
    t, gpu = _transport()
    dev = t.on_consume(_post(t, _collated(t, 5)))
    gc.collect()
    t.close()  # synchronizes the pending copy before dropping its buffer
    assert (gpu.read(dev["x"]).value == 5).all()
    assert t.pinned_pool.reserved_bytes == 0 and gpu.host_cache_emptied >= 1
    again = t.on_consume(_post(t, _collated(t, 6)))  # a later epoch pins afresh
    gpu.pump()
    assert (gpu.read(again["x"]).value == 6).all()


def test_close_cleans_up_even_when_cuda_fails():
    class Failing(FakeGPU):
        def synchronize(self, event):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    t, gpu = _transport(gpu=Failing())
    held = _collated(t, 1)  # a batch the caller still holds
    dev = _post(t, _collated(t, 2))
    gc.collect()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        t.close()
    assert gpu.host_cache_emptied == 1  # the finally ran
    assert t.pinned_pool.free_bytes == 0
    del held, dev


def test_a_failed_copy_keeps_the_posted_copies_buffers_until_their_event():
    t, gpu = _transport()
    payload = {"a": _collated(t, 1)["x"], "b": _collated(t, 2)["x"]}
    real_copy = gpu.copy
    calls = []

    def copy_then_fail(host, stream):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real_copy(host, stream)

    gpu.copy = copy_then_fail
    with pytest.raises(torch.OutOfMemoryError):
        t.fetch_multiple([payload])
    gpu.copy = real_copy
    del payload
    gc.collect()
    # "a" is still read by its posted copy; "b" never was: back at once
    assert t.memory_stats().pinned_bytes_in_use == size_class(N * 8)
    gpu.pump()
    assert t.memory_stats().pinned_bytes_in_use == 0


def test_collate_uses_the_pinned_pool_through_default_collate():
    t, gpu = _transport()
    host = DefaultCollate(allocator=t.host_allocator)(pa.table({"x": list(range(50_000))}))
    assert t.pinned_pool.owns(host["x"]) is not None  # the one copy landed in staging memory
    dev = t.on_consume(_post(t, host))
    gpu.pump()
    assert torch.equal(torch.from_numpy(gpu.read(dev["x"]).value), torch.arange(50_000))


def test_dataset_stats_report_the_transports_staging_memory(ray_session):
    import ray

    ds = ray.data.range(2048, override_num_blocks=4)
    gpu = FakeGPU(late_copies=False)  # a quiet GPU: copies run when posted
    budget = 2 * size_class(256 * 8)
    t = CudaTransport("cuda:0", ops=gpu, max_pinned_bytes=budget)
    loader = trd.RayIterableDataset(ds, batch_size=256, transport=t, preserve_order=True)
    ids = [gpu.read(b["id"]).value for b in loader]
    assert np.array_equal(np.concatenate(ids), np.arange(2048))
    gc.collect()
    st = loader.stats()
    assert 0 < st.pinned_bytes_reserved <= budget and st.pinned_bytes_in_use == 0
    assert set(st.pageable_fallbacks) <= {"budget"}
    assert "pinned staging: 0 B in use of" in str(st)
    loader.close()
    assert loader.stats().pinned_bytes_reserved == 0

    none = CudaTransport("cuda:0", ops=FakeGPU(late_copies=False), max_pinned_bytes=0)
    loader = trd.RayIterableDataset(ds, batch_size=256, transport=none)
    assert sum(len(gpu_ids["id"]) for gpu_ids in loader) == 2048
    st = loader.stats()
    assert st.pageable_fallbacks == {"budget": 8} and st.pinned_bytes_reserved == 0
    loader.close()
