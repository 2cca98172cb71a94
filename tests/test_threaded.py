"""Stage 4: iter_threaded, without Ray."""

from __future__ import annotations

import gc
import threading

import pytest

import torch_raydata as trd
from torch_raydata.pipeline.threaded import ThreadedIterator


def _trd_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("trd-")]


def test_every_item_once_in_completion_order():
    with trd.iter_threaded(range(200), lambda x: x * 2, num_workers=3, output_buffer_size=5) as it:
        out = list(it)
    assert sorted(out) == [2 * i for i in range(200)]
    assert _trd_threads() == []


def test_shared_stateful_iterator_is_pulled_once_per_item():
    pulled = []

    def gen():
        for i in range(100):
            pulled.append(i)  # a stateful iterator: N workers must not each run a copy
            yield i

    out = list(trd.iter_threaded(gen(), lambda x: x, num_workers=4, output_buffer_size=3))
    assert sorted(out) == list(range(100))
    assert pulled == list(range(100))


@pytest.mark.parametrize("kw", [{"num_workers": 0}, {"output_buffer_size": 0}, {"num_workers": -1}])
def test_bad_sizes_raise_value_error(kw):
    args = {"num_workers": 2, "output_buffer_size": 2} | kw
    with pytest.raises(ValueError, match=next(iter(kw))):
        trd.iter_threaded(range(3), lambda x: x, **args)


class Boom(RuntimeError):
    pass


def test_worker_exception_reaches_consumer_with_type_message_stage_and_batch():
    def fn(x):
        if x == 7:
            raise Boom("bad item 7")
        return x

    it = trd.iter_threaded(
        range(50),
        fn,
        num_workers=2,
        output_buffer_size=2,
        stage="collate",
        describe=lambda x: f"batch {x}",
    )
    with pytest.raises(Boom, match="bad item 7") as ei:
        list(it)
    notes = "\n".join(getattr(ei.value, "__notes__", []))
    assert "collate" in notes and "batch 7" in notes
    assert _trd_threads() == []  # the consumer's exception path joined every worker


def test_input_iterator_exception_is_forwarded():
    def gen():
        yield 1
        raise KeyError("source broke")

    with pytest.raises(KeyError, match="source broke"):
        list(trd.iter_threaded(gen(), lambda x: x, num_workers=2, output_buffer_size=2))
    assert _trd_threads() == []


def test_break_and_close_join_threads():
    it = trd.iter_threaded(iter(range(10**9)), lambda x: x, num_workers=3, output_buffer_size=4)
    for i, _ in enumerate(it):
        if i == 5:
            break
    it.close()
    assert _trd_threads() == []


def test_garbage_collection_stops_threads():
    def consume_a_little():
        it = trd.iter_threaded(iter(range(10**9)), lambda x: x, num_workers=2, output_buffer_size=2)
        next(it)
        # `it` goes out of scope here without close()

    consume_a_little()
    gc.collect()
    # __del__ closed (stopped and joined) the pool; nothing else keeps workers alive.
    assert _trd_threads() == []


@pytest.mark.parametrize("manual_release", [False, True])
def test_bound_holds_under_a_slow_consumer(manual_release):
    """Detector, not stopwatch: the input counts items taken; the consumer only takes the
    next result once the pool is saturated, so any overshoot would be observed."""
    bound = 3
    lock = threading.Lock()
    state = {"taken": 0, "consumed": 0, "max_outstanding": 0}
    saturated = threading.Event()
    n = 60

    def gen():
        for i in range(n):
            with lock:
                state["taken"] += 1
                outstanding = state["taken"] - state["consumed"]
                state["max_outstanding"] = max(state["max_outstanding"], outstanding)
                if outstanding >= bound or state["taken"] == n:
                    saturated.set()
            yield i

    it = ThreadedIterator(
        gen(), lambda x: x, num_workers=4, output_buffer_size=bound, manual_release=manual_release
    )
    got = []
    with it:
        while True:
            assert saturated.wait(timeout=30), "pool never filled its bound"
            with lock:
                saturated.clear()
            try:
                item = next(it)
            except StopIteration:
                break
            got.append(item)
            with lock:
                state["consumed"] += 1
                if state["taken"] == n or state["taken"] - state["consumed"] >= bound:
                    saturated.set()
            if manual_release:
                it.release()
    assert sorted(got) == list(range(n))
    assert state["max_outstanding"] <= bound
    assert state["max_outstanding"] == bound  # and the pool did use its whole bound


def test_fn_runs_concurrently_on_workers():
    """Detector: two calls of fn overlap (a barrier only passes with 2 concurrent calls)."""
    barrier = threading.Barrier(2, timeout=30)

    def fn(x):
        if x < 2:
            barrier.wait()
        return x

    assert sorted(trd.iter_threaded(range(4), fn, num_workers=2, output_buffer_size=2)) == [
        0,
        1,
        2,
        3,
    ]


def test_slots_count_and_time_out():
    from torch_raydata.pipeline.queues import Slots

    slots = Slots(2)
    assert slots.acquire(timeout=0) and slots.acquire(timeout=0)
    assert not slots.acquire(timeout=0)
    assert not slots.acquire(timeout=0.01)
    slots.release()
    assert slots.acquire(timeout=0)
    woke = threading.Event()

    def waiter():
        if slots.acquire(timeout=10):
            woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    slots.release()
    assert woke.wait(10)
    t.join()


def test_workers_started_by_the_first_one_are_all_joined_even_when_closed_at_once():
    """The first worker starts the others; a pool closed while it does so, or whose input
    is empty, still ends with every worker accounted for and joined (the autouse fixture
    fails the test on a leftover thread)."""
    for _ in range(50):
        it = trd.iter_threaded(range(100), lambda x: x, num_workers=6, output_buffer_size=2)
        it.close()
    assert list(trd.iter_threaded([], lambda x: x, num_workers=6, output_buffer_size=2)) == []
    it = trd.iter_threaded(range(3), lambda x: x, num_workers=6, output_buffer_size=8)
    assert sorted(it) == [0, 1, 2]
    assert sum(t.name.startswith("trd-iter_threaded") for t in threading.enumerate()) == 0


def test_a_worker_that_cannot_start_is_an_error_on_the_consumer(monkeypatch):
    """A failed thread start (e.g. the process's thread limit) must reach the consumer,
    not leave it waiting for a worker that never ran."""
    from torch_raydata.pipeline import threaded

    real = threaded._PoolState.start_worker

    def start_worker(self, i, spawner=False):
        if i >= 2:
            raise RuntimeError("can't start new thread")
        real(self, i, spawner)

    monkeypatch.setattr(threaded._PoolState, "start_worker", start_worker)
    it = trd.iter_threaded(range(1000), lambda x: x, num_workers=4, output_buffer_size=2)
    with pytest.raises(RuntimeError, match="can't start new thread") as info:
        for _ in it:
            pass
    assert any("starting iter_threaded worker" in n for n in getattr(info.value, "__notes__", []))


# -- growing pool (initial_workers < num_workers) -------------------------------------------
class _Gate:
    """fn for the growing tests: each call says it entered, then waits for a pass."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.passes = threading.Semaphore(0)
        self.threads: set[str] = set()

    def __call__(self, x: int) -> int:
        self.threads.add(threading.current_thread().name)
        self.entered.release()
        assert self.passes.acquire(timeout=30), "test never let this item through"
        return x


def test_pool_grows_one_thread_per_starved_streak_up_to_num_workers():
    from torch_raydata.pipeline.threaded import GROW_AFTER

    gate = _Gate()
    grown: list[int] = []
    it = trd.iter_threaded(
        range(40), gate, num_workers=3, output_buffer_size=6, initial_workers=1, on_grow=grown.append
    )
    assert gate.entered.acquire(timeout=30)  # worker 0 is inside fn; nothing is ready
    assert it.workers == 1
    for expected in (2, 3):
        for _ in range(GROW_AFTER - 1):
            it._maybe_grow()
            assert it.workers == expected - 1  # one starved call is not enough
        it._maybe_grow()
        assert it.workers == expected
        assert gate.entered.acquire(timeout=30)  # the new worker took an item and is in fn
    for _ in range(3 * GROW_AFTER):
        it._maybe_grow()
    assert it.workers == 3 and grown == [2, 3]  # never beyond num_workers
    for _ in range(40):
        gate.passes.release()
    assert sorted(it) == list(range(40))  # every item once, whatever thread ran it
    assert len(gate.threads) == 3
    assert _trd_threads() == []


def test_a_ready_result_resets_the_starved_streak():
    from torch_raydata.pipeline.threaded import GROW_AFTER

    gate = _Gate()
    it = trd.iter_threaded(range(4), gate, num_workers=3, output_buffer_size=4, initial_workers=1)
    assert gate.entered.acquire(timeout=30)
    for _ in range(GROW_AFTER - 1):
        it._maybe_grow()  # starved, but not yet long enough
    gate.passes.release()  # item 0 completes; worker 0 then takes item 1
    assert gate.entered.acquire(timeout=30)
    for _ in range(100_000):  # detector: item 0's result reached the queue
        if it.has_ready():
            break
        threading.Event().wait(0.0005)
    assert next(it) == 0  # found a result waiting: the streak starts over
    for _ in range(GROW_AFTER - 1):
        it._maybe_grow()
    assert it.workers == 1
    for _ in range(3):
        gate.passes.release()
    assert sorted(it) == [1, 2, 3]


def test_pool_does_not_grow_when_the_input_is_the_bottleneck():
    more = threading.Semaphore(0)
    waiting = threading.Event()

    def source():
        for i in range(3):
            waiting.set()
            assert more.acquire(timeout=30)
            yield i

    it = trd.iter_threaded(source(), lambda x: x, num_workers=3, output_buffer_size=4, initial_workers=1)
    assert waiting.wait(timeout=30)  # worker 0 waits on the input, not inside fn
    for _ in range(10):
        it._maybe_grow()
    assert it.workers == 1
    for _ in range(3):
        more.release()
    assert sorted(it) == [0, 1, 2]
    assert _trd_threads() == []


def test_a_consumer_slower_than_fn_keeps_one_thread():
    def fn(x: int) -> int:
        return x * 3

    it = trd.iter_threaded(range(300), fn, num_workers=4, output_buffer_size=6, initial_workers=1)
    out = []
    for _ in range(300):
        while not it.has_ready():  # the consumer is the slow side: a result always waits
            threading.Event().wait(0.0002)
        out.append(next(it))
    assert out and sorted(out) == [3 * i for i in range(300)]
    assert it.workers == 1
    assert list(it) == []
    assert _trd_threads() == []


def test_growing_pool_forwards_errors_and_stops_every_thread():
    gate = _Gate()

    def fn(x: int) -> int:
        if x == 7:
            raise KeyError("collate broke at 7")
        return gate(x)

    it = trd.iter_threaded(range(50), fn, num_workers=3, output_buffer_size=4, initial_workers=1)
    assert gate.entered.acquire(timeout=30)
    for _ in range(4):
        it._maybe_grow()
    assert it.workers == 3
    for _ in range(50):
        gate.passes.release()
    with pytest.raises(KeyError, match="collate broke at 7"):
        list(it)
    assert _trd_threads() == []


def test_thread_cpu_is_reported_once_per_worker():
    seen: list[float] = []
    it = trd.iter_threaded(
        range(20), lambda x: x, num_workers=2, output_buffer_size=4, on_thread_cpu=seen.append
    )
    assert sorted(it) == list(range(20))
    assert len(seen) == 2 and all(s >= 0 for s in seen)
