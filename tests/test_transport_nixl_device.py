"""NixlTransport to a CUDA device, on CPU: real NIXL READs (DRAM over UCX, both ends in
this process) into buffers the transport treats as VRAM, with device clones on the
adversarial fake GPU of ``tests/fake_cuda.py`` (clones run late, when a test pumps them).

Each test fails when one piece of the VRAM path is removed (named in its docstring).
Real CUDA: ``tests/test_gpu.py``.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from torch_raydata.collate import DefaultCollate
from torch_raydata.transports import NixlTransport
from torch_raydata.transports.nixl.worker import CollateWorker

from .fake_cuda import FakeGPU
from .test_transport_nixl import _Plan, _table


@pytest.fixture
def vram():
    gpu = FakeGPU()
    worker = CollateWorker("trd-test-worker-vram", DefaultCollate(), id_column="id", max_slabs=6)
    transport = NixlTransport("cuda:0", ops=gpu, in_flight=2)
    yield worker, transport, gpu
    transport.close()
    worker.close()


def _read(worker, transport, i, n=64):
    desc = worker.collate(_Plan(i, _table(n, 1000 * i)))
    (batch,) = transport.wait_fetch_complete(transport.fetch_multiple([desc]))
    return batch


def _ids(i, n=64):
    return np.arange(1000 * i, 1000 * i + n)


def test_a_buffer_is_not_read_into_again_before_its_clones_ran(vram):
    """Removal caught: the event-gated return of a VRAM buffer to the pool."""
    worker, transport, gpu = vram
    first = transport.on_consume(_read(worker, transport, 0))  # its clones are queued, late
    second = transport.on_consume(_read(worker, transport, 1))  # a READ of the same size
    assert transport.pool.registered == 2  # went to a second buffer
    gpu.pump()
    assert (gpu.read(first["id"]).value == _ids(0)).all()
    assert (gpu.read(second["id"]).value == _ids(1)).all()
    third = transport.on_consume(_read(worker, transport, 2))  # clones done: reused
    assert transport.pool.registered == 2
    gpu.pump()
    assert (gpu.read(third["id"]).value == _ids(2)).all()
    img = gpu.read(third["img"]).value.reshape(64, 48)
    assert (img == (_ids(2) % 251)[:, None]).all()


def test_step_reads_after_on_consume_wait_for_the_clones(vram):
    """Removal caught: on_consume's wait of the consumer's stream (or on_consume itself)."""
    worker, transport, gpu = vram
    probes = []
    for i in range(3):
        batch = transport.on_consume(_read(worker, transport, i))
        probes.append((gpu.read(batch["id"]), gpu.read(batch["x"])))
    assert all(p.value is None for pair in probes for p in pair)  # queued behind clones
    gpu.pump()
    for i, (ids, x) in enumerate(probes):
        assert (ids.value == _ids(i)).all()
        assert np.allclose(x.value, _ids(i).astype(np.float32) / 3)


def test_a_busy_consumer_stream_and_a_non_default_stream(vram):
    """The step runs on its own stream, busy with earlier work, and drops each batch
    without a sync: every batch still reads right (clones recorded on that stream)."""
    worker, transport, gpu = vram
    side = gpu.eager_stream("step")
    probes = []
    with gpu.stream(side):
        gate = gpu.busy()
        for i in range(6):
            batch = transport.on_consume(_read(worker, transport, i))
            probes.append(gpu.read(batch["id"]))
            del batch
            gpu.pump()
        gpu.open(gate)
    for i, p in enumerate(probes):
        assert (p.value == _ids(i)).all(), i
    gc.collect()


def test_close_waits_for_pending_clones(vram):
    worker, transport, gpu = vram
    batch = transport.on_consume(_read(worker, transport, 4))
    probe = gpu.read(batch["id"])
    transport.close()  # synchronizes the clones before deregistering their buffer
    assert (probe.value == _ids(4)).all()


def test_payloads_never_consumed_leave_no_events(vram):
    worker, transport, gpu = vram
    batches = [_read(worker, transport, i) for i in range(3)]
    assert len(transport._device.handoff) > 0
    del batches
    gc.collect()
    assert len(transport._device.handoff) == 0
    gpu.pump()

