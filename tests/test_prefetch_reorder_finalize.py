"""Stages 2, 5 and 6 without Ray: prefetch, reorder, finalize."""

from __future__ import annotations

import threading

import pytest

from torch_raydata.pipeline.finalize import Finalizer
from torch_raydata.pipeline.prefetch import Prefetcher
from torch_raydata.pipeline.reorder import restore_order
from torch_raydata.pipeline.stats import StatsRecorder
from torch_raydata.pipeline.types import Batch
from torch_raydata.transports import FetchRequest, LocalTransport, Transport

from .fakes import make_blocks, source_of


# -- stage 2 ------------------------------------------------------------------------------
def test_prefetch_yields_every_block_in_stream_order():
    tables = make_blocks([10] * 20)
    blocks, fetcher = source_of(tables)
    out = list(Prefetcher(iter(blocks), fetcher, window_rows=30))
    assert [sb.ref for sb, _ in out] == [b.ref for b in blocks]
    assert all(t is tables[i] for i, (_, t) in enumerate(out))


class _Drained:
    """A source that sets ``done`` once every block was pulled (a detector: the source
    thread pulls ahead of the prefetch thread, so what a wait sees depends on it)."""

    def __init__(self, blocks) -> None:
        self._it = iter(blocks)
        self.done = threading.Event()

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            self.done.set()
            raise


def test_prefetch_keeps_stream_order_when_later_blocks_are_ready_first():
    tables = make_blocks([10] * 6)
    blocks, fetcher = source_of(tables)
    src = _Drained(blocks)
    ready = {"b1", "b2", "b3", "b4", "b5"}
    fetcher.ready = lambda r: src.done.is_set() and r in ready
    fetcher.became_ready = threading.Event()
    p = Prefetcher(src, fetcher, max_bytes=10**9)
    # b0 is not ready: nothing may be handed on before it, whatever else is ready.
    assert fetcher.waited_after_get.wait(30)
    assert fetcher.get_calls[0] == ["b1", "b2", "b3", "b4", "b5"]
    assert p._out.empty()
    ready.add("b0")
    fetcher.became_ready.set()
    assert [sb.ref for sb, _ in p] == [f"b{i}" for i in range(6)]
    p.close()


def test_prefetch_makes_one_batched_wait_over_all_pending_refs():
    tables = make_blocks([10] * 8)
    blocks, fetcher = source_of(tables)
    src = _Drained(blocks)
    fetcher.ready = lambda r: src.done.is_set()  # ready once all 8 are pending
    list(Prefetcher(src, fetcher, max_bytes=10**9))
    # Every pending ref in one wait, and the ready ones in one get: no per-ref calls.
    assert ([f"b{i}" for i in range(8)], 0, None) in fetcher.wait_calls
    assert fetcher.get_calls == [[f"b{i}" for i in range(8)]]


def test_a_ready_block_is_handed_on_while_the_source_produces_the_next():
    """Pulling the next block blocks until Ray has produced it; a block already in hand
    must reach the consumer meanwhile (it used to wait until the window was full)."""
    tables = make_blocks([10] * 3)
    blocks, fetcher = source_of(tables)
    produced = threading.Event()  # the test lets the source produce block 1

    def source():
        yield blocks[0]
        assert produced.wait(30)
        yield from blocks[1:]

    p = Prefetcher(source(), fetcher, max_bytes=10**9)
    got: list = []
    first = threading.Event()

    def consume() -> None:
        for sb, _ in p:
            got.append(sb.ref)
            first.set()

    t = threading.Thread(target=consume, name="test-consumer")
    t.start()
    try:
        assert first.wait(30), "block 0 was held back while the source was blocked"
        assert got == ["b0"]
    finally:
        produced.set()
        t.join(30)
    assert got == ["b0", "b1", "b2"]
    p.close()


def test_prefetch_window_is_bounded_in_bytes():
    tables = make_blocks([100] * 30, extra=False)  # 800 B per block
    blocks, fetcher = source_of(tables)
    stats = StatsRecorder()
    p = Prefetcher(iter(blocks), fetcher, window_rows=250, stats=stats)  # ~2000 B
    got = []
    for sb, _t in p:
        got.append(sb.ref)
        # Detector: the window never holds more than the budget plus one admitted block.
        assert p.window_bytes <= p.budget_bytes() + 800
    assert len(got) == 30
    assert stats.snapshot(0).peak_buffered_bytes <= 2000 + 800
    assert stats.snapshot(0).buffered_bytes == 0


def test_prefetch_admits_one_block_larger_than_the_window():
    tables = make_blocks([1000], extra=False)
    blocks, fetcher = source_of(tables)
    assert len(list(Prefetcher(iter(blocks), fetcher, max_bytes=1))) == 1


def test_prefetch_error_reaches_consumer_and_thread_ends():
    tables = make_blocks([10] * 4)
    blocks, fetcher = source_of(tables)
    fetcher.fail_on_get = "b2"
    p = Prefetcher(iter(blocks), fetcher, window_rows=10)
    with pytest.raises(ConnectionError, match="object b2 lost") as ei:
        list(p)
    assert "stage 2 (prefetch)" in "\n".join(ei.value.__notes__)
    p.close()
    assert not p._thread.is_alive()


def test_prefetch_close_mid_stream_releases_window():
    tables = make_blocks([10] * 100)
    blocks, fetcher = source_of(tables)
    stats = StatsRecorder()
    p = Prefetcher(iter(blocks), fetcher, window_rows=50, stats=stats)
    next(p)
    p.close()
    assert not p._thread.is_alive()
    assert stats.snapshot(0).buffered_bytes == 0


# -- stage 5 ------------------------------------------------------------------------------
def _b(i):
    return Batch(idx=i, data=i, num_rows=1, nbytes=1)


def test_reorder_restores_index_order_and_releases_on_emit():
    emitted = []
    order = [3, 0, 2, 1, 5, 4, 6]
    out = list(restore_order((_b(i) for i in order), on_emit=lambda: emitted.append(1)))
    assert [b.idx for b in out] == list(range(7))
    assert len(emitted) == 7


def test_reorder_detects_duplicates_and_gaps():
    with pytest.raises(RuntimeError, match="seen twice"):
        list(restore_order(_b(i) for i in [0, 0]))
    with pytest.raises(RuntimeError, match="waiting for batch 1"):
        list(restore_order(_b(i) for i in [0, 2]))


# -- stage 6 ------------------------------------------------------------------------------
class AsyncFake(Transport):
    """Posts transfers and completes them on wait; records how many were posted before
    the first wait (the detector for several transfers in flight)."""

    def __init__(self, fail_at=None):
        super().__init__("cpu")
        self.posted = 0
        self.posted_before_first_wait = None
        self.fail_at = fail_at
        self.concurrent = threading.Semaphore(1)

    def fetch_multiple(self, batches):
        self.posted += len(batches)
        return FetchRequest(batches=batches, handle=list(batches))

    def wait_fetch_complete(self, request, timeout=None):
        # Finalize is one thread: a second concurrent call would fail this acquire.
        assert self.concurrent.acquire(blocking=False), "transport called concurrently"
        try:
            if self.posted_before_first_wait is None:
                self.posted_before_first_wait = self.posted
            if self.fail_at is not None and self.fail_at in request.handle:
                raise OSError(f"transfer of {self.fail_at} failed")
            return [("moved", x) for x in request.handle]
        finally:
            self.concurrent.release()


class ReadyUpstream:
    """An upstream that always has the next batch ready (like a full collate pool)."""

    def __init__(self, n):
        self.it = iter([_b(i) for i in range(n)])

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)

    def has_ready(self):
        return True


def test_finalize_threaded_keeps_order_and_several_transfers_in_flight():
    t = AsyncFake()
    f = Finalizer(ReadyUpstream(20), t, in_flight=3)
    out = list(f)
    f.close()
    assert [b.idx for b in out] == list(range(20))
    assert all(b.data == ("moved", b.idx) for b in out)
    assert t.posted_before_first_wait > 1


def test_finalize_transport_error_names_the_batch():
    f = Finalizer(ReadyUpstream(10), AsyncFake(fail_at=4), in_flight=2)
    with pytest.raises(OSError, match="transfer of 4 failed") as ei:
        list(f)
    assert "batch 4" in "\n".join(ei.value.__notes__)
    f.close()
    assert not f._thread.is_alive()


def test_finalize_inline_for_local_transport():
    f = Finalizer(iter([_b(i) for i in range(5)]), LocalTransport())
    assert f._thread is None
    assert [b.idx for b in f] == list(range(5))
