"""Faults inside the pipeline, on a small local Ray: a collate_fn or a transport raises, and
the training loop stops early (break, close, garbage collection, KeyboardInterrupt).

Each test asserts what the training step sees (the original exception with its stage and
batch index; only whole batches before it), that every torch_raydata thread is joined
within 1 s of the error reaching the consumer, that no object reference, actor or
object-store byte outlives the epoch, and that the next iteration works.
"""

from __future__ import annotations

import _thread
import gc
import signal
import threading
import time

import numpy as np
import pytest
from torch.utils.data import DataLoader

import torch_raydata as trd
from torch_raydata.collate import DefaultCollate
from torch_raydata.transports import FetchRequest, Transport

from ._probes import Snapshot, join_trd_threads

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]

ROWS, BS, WIDTH = 4096, 128, 256


def _ds(rows: int = ROWS, blocks: int = 8):
    import ray

    def payload(b):
        ids = b["id"]
        return {"id": ids, "x": np.broadcast_to(ids[:, None] % 251, (len(ids), WIDTH)).astype(np.uint8)}

    return ray.data.range(rows, override_num_blocks=blocks).map_batches(payload, batch_size=None)


def _check_batch(b) -> None:
    """A whole, consistent batch: BS rows whose payload matches their IDs."""
    assert b["id"].shape == (BS,) and b["x"].shape == (BS, WIDTH)
    assert (b["x"][:, 0].long() == b["id"] % 251).all()


def _all_ids(loader) -> list[int]:
    return sorted(np.concatenate([b["id"].numpy() for b in loader]).tolist())


# -- collate_fn raises at batch k ---------------------------------------------------------------
class CollateBoom(ValueError):
    pass


class FailAt:
    """DefaultCollate, except the batch starting at row ``k * BS`` raises (while armed)."""

    def __init__(self, k: int) -> None:
        self.k, self.armed, self.raised_at = k, True, None
        self.inner = DefaultCollate()

    def __call__(self, table):
        first = table.column("id")[0].as_py()
        if self.armed and first == self.k * BS:
            self.raised_at = time.monotonic()
            raise CollateBoom(f"cannot collate the batch starting at row {first}")
        return self.inner(table)


@pytest.mark.parametrize("preserve_order", [True, False])
def test_collate_error_at_batch_k_reaches_the_step_and_every_thread_stops(preserve_order):
    k = 5
    collate = FailAt(k)
    ds = trd.RayIterableDataset(
        _ds(), batch_size=BS, collate_fn=collate, num_workers=3, preserve_order=preserve_order
    )
    snap = Snapshot()
    got = []
    with pytest.raises(CollateBoom, match=f"starting at row {k * BS}") as ei:
        for b in DataLoader(ds, batch_size=None):
            got.append(b)
    caught = time.monotonic()
    assert join_trd_threads(within=1.0) == []
    joined = time.monotonic()
    notes = "\n".join(getattr(ei.value, "__notes__", []))
    assert "stage 4 (collate)" in notes and "trd-stage 4 (collate)" in notes
    for b in got:  # only whole batches, none of the failing one's rows
        _check_batch(b)
        assert not (b["id"] // BS == k).any()
    if preserve_order:  # batches 0..k-1 first, then the error naming batch k
        assert f"batch {k}" in notes
        assert [int(b["id"][0]) for b in got] == [i * BS for i in range(k)]
    else:
        assert "batch " in notes and len(got) < ROWS // BS
    print(
        f"\ncollate fault (preserve_order={preserve_order}): raised in the worker -> caught "
        f"by the step {caught - collate.raised_at:.3f} s, threads joined "
        f"{joined - caught:.3f} s after"
    )
    del got, b
    snap.check()
    collate.armed = False  # the next epoch works
    assert _all_ids(ds) == list(range(ROWS))


def test_collate_error_in_the_first_batch_before_any_is_delivered():
    collate = FailAt(0)
    ds = trd.RayIterableDataset(_ds(), batch_size=BS, collate_fn=collate, preserve_order=True)
    it = iter(ds)
    with pytest.raises(CollateBoom) as ei:
        next(it)
    assert "batch 0" in "\n".join(ei.value.__notes__)
    assert join_trd_threads(within=1.0) == []
    with pytest.raises(StopIteration):  # the failed epoch stays finished
        next(it)
    assert ds.stats().batches == 0


# -- the transport raises -------------------------------------------------------------------------
class LinkDown(ConnectionError):
    pass


class FlakyTransport(Transport):
    """Fails the ``k``-th transfer while armed: in ``fetch`` (synchronous, posted on the
    finalize thread or inline) or in ``wait_fetch_complete`` (asynchronous)."""

    def __init__(self, k: int, *, threaded: bool, where: str) -> None:
        super().__init__("cpu")
        self.needs_thread = threaded
        self.k, self.where, self.armed, self.calls = k, where, True, 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.armed and self.calls == self.k + 1:
            raise LinkDown(f"link down on transfer {self.calls}")

    def fetch(self, batch):
        if self.where == "fetch":
            self._maybe_fail()
        return batch

    def wait_fetch_complete(self, request: FetchRequest, timeout=None):
        if self.where == "wait":
            self._maybe_fail()
        return super().wait_fetch_complete(request, timeout)


@pytest.mark.parametrize(
    "threaded, where", [(True, "fetch"), (True, "wait"), (False, "fetch")]
)
def test_transport_error_reaches_the_step_with_stage_6_and_the_batch(threaded, where):
    k = 4
    transport = FlakyTransport(k, threaded=threaded, where=where)
    ds = trd.RayIterableDataset(
        _ds(), batch_size=BS, transport=transport, num_workers=2, preserve_order=True
    )
    snap = Snapshot()
    got = []
    with pytest.raises(LinkDown, match=f"transfer {k + 1}") as ei:
        for b in ds:
            got.append(b)
    assert join_trd_threads(within=1.0) == []
    notes = "\n".join(ei.value.__notes__)
    assert "stage 6 (finalize)" in notes and f"batch {k}" in notes
    assert [int(b["id"][0]) for b in got] == [i * BS for i in range(k)]
    for b in got:
        _check_batch(b)
    del got, b
    snap.check(dataset=ds)
    transport.armed = False
    assert _all_ids(ds) == list(range(ROWS))
    ds.close()


# -- the consumer stops early -----------------------------------------------------------------
def _break_in_loop(ds):
    for i, _ in enumerate(DataLoader(ds, batch_size=None)):
        if i == 3:
            break  # no close(): the loader iterator is dropped with the loop


def _close_iterator(ds):
    it = iter(ds)
    next(it)
    it.close()


def _close_dataset(ds):
    it = iter(ds)
    next(it)
    ds.close()
    with pytest.raises(StopIteration):
        next(it)


def _garbage_collected(ds):
    it = iter(ds)
    next(it)
    del it
    gc.collect()


def _keyboard_interrupt_in_the_step(ds):
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(DataLoader(ds, batch_size=None)):
            if i == 2:
                raise KeyboardInterrupt


def _keyboard_interrupt_while_waiting_for_a_batch(ds):
    """SIGINT arrives while the step waits for batch 3 (its collate is stuck until the
    interrupt is delivered), as with Ctrl-C during a data stall."""
    entered, waiting, release = threading.Event(), threading.Event(), threading.Event()
    inner = DefaultCollate()

    def collate(table):
        if table.column("id")[0].as_py() == 3 * BS:
            entered.set()
            release.wait(30)
        return inner(table)

    def on_sigint(signum, frame):
        release.set()
        raise KeyboardInterrupt

    ds.collate_fn = collate
    interrupter = threading.Thread(
        target=lambda: entered.wait(30)
        and waiting.wait(30)
        and _thread.interrupt_main(signal.SIGINT),
        name="test-interrupter",
    )
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        interrupter.start()
        got = 0
        with pytest.raises(KeyboardInterrupt):
            for _ in ds:
                got += 1
                if got == 3:
                    waiting.set()  # the next next() blocks on batch 3
        assert got == 3 and release.is_set()
    finally:
        signal.signal(signal.SIGINT, old)
        interrupter.join()
        ds.collate_fn = inner


@pytest.mark.parametrize(
    "stop",
    [
        _break_in_loop,
        _close_iterator,
        _close_dataset,
        _garbage_collected,
        _keyboard_interrupt_in_the_step,
        _keyboard_interrupt_while_waiting_for_a_batch,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_consumer_stops_early_and_nothing_is_left_behind(stop):
    ds = trd.RayIterableDataset(
        _ds(), batch_size=BS, num_workers=2, preserve_order=True, shuffle_buffer_size=None
    )
    snap = Snapshot()
    t0 = time.monotonic()
    stop(ds)
    t1 = time.monotonic()
    report = snap.check(dataset=ds)
    print(f"\n{stop.__name__}: stop {t1 - t0:.2f}s check {time.monotonic() - t1:.2f}s {report}")
    assert report["refs_after"] <= report["refs_before"]
    assert _all_ids(ds) == list(range(ROWS))  # the next epoch is whole
    st = ds.stats()
    assert st.rows == ROWS and st.buffered_batches == 0 and st.buffered_bytes == 0
