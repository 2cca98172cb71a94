"""Epoch pipelining (pipeline/prestart.py): the next epoch's stream starts before the
current one ends. Unit tests of NextEpoch on fake streams (no Ray), then integration on a
small local Ray: exactly-once epochs, per-epoch shuffle, the byte hold, resume, close/GC,
and early stops that let running tasks finish instead of cancelling them."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import torch_raydata as trd
from torch_raydata.pipeline.prestart import NextEpoch

# -- NextEpoch without Ray ------------------------------------------------------------------


class _Stream:
    def __init__(self) -> None:
        self.done = False  # the executor finished producing
        self.released = False
        self.closed = False

    def producer_done(self) -> bool:
        return self.done

    def has_idle_cpus(self) -> bool:
        return self.idle

    idle = True  # the running executor leaves a CPU idle

    def release(self) -> None:
        self.released = True

    def queued_bytes(self) -> int:
        return 0 if self.closed else 123

    def close(self) -> None:
        self.closed = True


class _Opener:
    def __init__(self) -> None:
        self.streams: list[_Stream] = []
        self.holds: list[int] = []

    def __call__(self, hold: int, row_bytes: float | None) -> _Stream:
        self.holds.append(hold)
        s = _Stream()
        self.streams.append(s)
        return s


def test_stream_end_starts_the_next_epoch_once_and_claim_lifts_the_hold():
    opener = _Opener()
    nxt = NextEpoch(opener, enabled=True)
    observe = nxt.watch(_Stream(), window_rows=10)
    observe(100, False, 1000)
    observe(200, False, 1000)
    assert opener.streams == []  # the current epoch still computes: wait
    observe(200, True)
    observe(200, True)  # a second trigger is a no-op
    assert len(opener.streams) == 1 and nxt.pending
    assert opener.holds == [100]  # 10 window rows at 10 bytes per row measured
    assert nxt.queued_bytes() == 123
    stream, lead = nxt.claim()
    assert stream is opener.streams[0] and stream.released and lead >= 0
    assert not nxt.pending and nxt.claim() is None
    assert (nxt.started, nxt.used, nxt.discarded) == (1, 1, 0)


def test_a_finished_executor_starts_the_next_epoch_before_its_blocks_are_consumed():
    """Once the running epoch's executor has produced everything, the next one may use
    the CPUs while the step consumes what is buffered; not before (it would compete)."""
    opener = _Opener()
    nxt = NextEpoch(opener, enabled=True)
    current = _Stream()
    observe = nxt.watch(current, window_rows=10)
    for rows in range(10, 60, 10):
        observe(rows, False, 100)
    assert opener.streams == []
    current.done = True
    observe(60, False, 100)
    assert len(opener.streams) == 1  # before the stream's end reached the prefetch thread


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _timed_stream(clock: _Clock) -> _Stream:
    s = _Stream()
    s.opened_at = clock.now  # type: ignore[attr-defined]
    return s


def test_the_lead_is_the_measured_start_latency_at_this_epochs_rate():
    """Once an epoch's row count is known, the next one starts when the rows still to
    come take about as long as a stream takes from its open to its first block."""
    clock = _Clock()
    opener = _Opener()
    nxt = NextEpoch(opener, enabled=True, clock=clock)
    observe = nxt.watch(_timed_stream(clock), window_rows=10)  # epoch 0, started at iter()
    clock.now += 2.0
    observe(100, False, 100)  # first block 2 s after the open
    assert nxt.start_latency == 2.0
    for _ in range(9):  # 100 rows/s; the row count is not known yet: no early start
        clock.now += 1.0
        observe(nxt_rows := 100 + 100 * (_ + 1), False, 100)
    assert opener.streams == []
    observe(nxt_rows, True)
    assert nxt.epoch_rows == 1000 and len(opener.streams) == 1
    nxt.claim()  # epoch 1: its prestart had a block waiting (on time)

    observe = nxt.watch(_timed_stream(clock), window_rows=10)
    for i in range(1, 10):
        clock.now += 1.0
        observe(100 * i, False, 100)
        # 100 rows/s after the first block: 2 s left at 800 rows
        assert (len(opener.streams) == 2) == (100 * i >= 800), i
    assert nxt.start_latency == 2.0  # an on-time prestart leaves the estimate alone


def test_no_early_start_while_the_running_epoch_keeps_every_cpu_busy():
    """The time rule alone would start here; with every CPU busy the next epoch would
    take CPU from this one (measured slower on W7), so it waits for an idle CPU."""
    clock = _Clock()
    opener = _Opener()
    nxt = NextEpoch(opener, enabled=True, clock=clock)
    nxt.start_latency = 2.0
    current = _timed_stream(clock)
    current.idle = False
    observe = nxt.watch(current, window_rows=10, expected_rows=1000)
    for i in range(1, 10):
        clock.now += 1.0
        observe(100 * i, False, 100)
    assert opener.streams == []
    current.idle = True  # a task ended and none replaced it: the tail
    observe(950, False, 100)
    assert len(opener.streams) == 1


def test_never_before_half_the_epoch_and_a_late_prestart_raises_the_latency():
    clock = _Clock()
    opener = _Opener()
    nxt = NextEpoch(opener, enabled=True, clock=clock)
    observe = nxt.watch(_timed_stream(clock), window_rows=10, expected_rows=1000)
    clock.now += 30.0  # a very slow first block: the latency alone would start at once
    observe(10, False, 10)
    clock.now += 1.0
    observe(400, False, 10)
    assert opener.streams == []  # not before half the rows
    clock.now += 1.0
    observe(500, False, 10)
    assert len(opener.streams) == 1
    opener.streams[0].opened_at = clock.now  # type: ignore[attr-defined]
    nxt.start_latency = 0.5  # as if measured fast; the prestart's claim then finds no block
    opener.streams[0].closed = True  # queued_bytes() == 0: nothing produced yet
    clock.now += 3.0
    stream, lead = nxt.claim()
    assert lead == 3.0
    observe = nxt.watch(stream, window_rows=10)
    clock.now += 1.5
    observe(10, False, 10)  # its first block came 1.5 s after the claim
    assert nxt.start_latency == 4.5  # from its open (3 s lead + 1.5 s wait)


def test_disabled_and_closed_start_nothing():
    opener = _Opener()
    off = NextEpoch(opener, enabled=False)
    observe = off.watch(_Stream(), window_rows=1)
    observe(10, False, 40)
    observe(10, True)
    assert off.row_bytes == 4.0  # the row size is measured either way
    off.start(10)
    assert opener.streams == [] and off.claim() is None
    on = NextEpoch(opener, enabled=True)
    on.start(10)
    on.close()
    assert opener.streams[0].closed and on.discarded == 1
    on.start(10)
    assert len(opener.streams) == 1 and on.claim() is None


def test_discard_while_opening_closes_the_stream_when_it_arrives():
    entered, proceed = threading.Event(), threading.Event()
    made: list[_Stream] = []

    def slow_open(hold: int, row_bytes: float | None) -> _Stream:
        entered.set()
        assert proceed.wait(10)
        made.append(_Stream())
        return made[-1]

    nxt = NextEpoch(slow_open, enabled=True)
    t = threading.Thread(target=nxt.start, args=(10,), name="trd-test-opener")
    t.start()
    assert entered.wait(10)
    nxt.discard()
    proceed.set()
    t.join(10)
    assert made[0].closed and not nxt.pending and nxt.claim() is None
    nxt.start(10)  # the slot is free again
    assert nxt.pending


def test_claim_waits_for_a_stream_being_opened():
    entered, proceed = threading.Event(), threading.Event()

    def slow_open(hold: int, row_bytes: float | None) -> _Stream:
        entered.set()
        assert proceed.wait(10)
        return _Stream()

    nxt = NextEpoch(slow_open, enabled=True)
    t = threading.Thread(target=nxt.start, args=(10,), name="trd-test-opener")
    t.start()
    assert entered.wait(10)
    got: list = []
    c = threading.Thread(target=lambda: got.append(nxt.claim()), name="trd-test-claim")
    c.start()
    proceed.set()
    t.join(10)
    c.join(10)
    assert got and got[0] is not None and got[0][0].released


def test_a_failing_open_is_an_ordinary_start_later(caplog):
    def broken(hold: int, row_bytes: float | None) -> _Stream:
        raise OSError("cluster gone")

    nxt = NextEpoch(broken, enabled=True)
    nxt.start(10)
    assert not nxt.pending and nxt.claim() is None
    assert "starting the next epoch early failed" in caplog.text


# -- on Ray -------------------------------------------------------------------------------

ray_session = pytest.mark.usefixtures("ray_session")


def _streamed(n: int = 600, blocks: int = 12, width: int = 0):
    import ray

    def add(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"id": batch["id"], "x": batch["id"] * 2}
        if width:
            out["pad"] = np.zeros((len(batch["id"]), width), dtype=np.uint8)
        return out

    return ray.data.range(n, override_num_blocks=blocks).map_batches(add, batch_size=None)


def _ids(loader) -> list[int]:
    return [int(i) for b in loader for i in b["id"]]


def _wait_for_go_file(batch: dict[str, np.ndarray], folder: str = "") -> dict[str, np.ndarray]:
    """Inside a Ray task: run until the test creates ``go-<first id>`` (a detector: the
    task stands for a long map the test ends when it chooses)."""
    go = Path(folder) / f"go-{int(batch['id'][0])}"
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return batch


@ray_session
def test_a_cpu_is_idle_once_fewer_tasks_run_than_the_cluster_has_cpus(tmp_path):
    """The prestart gate on a real executor: with a task on every CPU the running epoch
    leaves none idle; once one task has ended with nothing left to start, it does (its
    tail), so the next epoch may start there. Ray does not count the training process's
    CPU: an earlier gate asked for one CPU more, which on 2 CPUs meant only at the very
    end (first batches of W7's later epochs 0.27-0.39 s after ``iter()`` instead of
    0.01-0.02 s, same wall)."""
    import ray

    from torch_raydata.pipeline.source import EpochBlocks

    cpus = int(ray.cluster_resources()["CPU"])
    assert cpus == 2  # the session fixture's cluster: one task per CPU below
    ds = ray.data.range(4, override_num_blocks=2).map_batches(
        _wait_for_go_file, batch_size=None, fn_kwargs={"folder": str(tmp_path)}
    )
    blocks = EpochBlocks.start(ds, hold_bytes=1 << 40)
    topology = blocks._executor._topology

    def running() -> int:
        return sum(op.num_active_tasks() for op in list(topology))

    def wait_until(cond, what: str) -> None:
        deadline = time.monotonic() + 60  # detector, bounded
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    try:
        wait_until(lambda: running() == cpus, "the two map tasks never ran together")
        assert not blocks.has_idle_cpus()
        (tmp_path / "go-0").touch()  # the first task ends; nothing is left to start
        wait_until(lambda: running() == 1, "the first task never ended")
        assert blocks.has_idle_cpus()
        (tmp_path / "go-2").touch()
        assert sum(sb.num_rows for sb in blocks) == 4  # and the epoch runs whole
    finally:
        (tmp_path / "go-0").touch()
        (tmp_path / "go-2").touch()
        blocks.close()


@ray_session
def test_ready_tells_whether_the_next_pull_waits_for_rays_tasks(tmp_path):
    """``EpochBlocks.ready``, the hint the remote epoch's chunker asks before each pull (it
    holds plans back for a fuller chunk only while the pull will not wait): False while the
    map's tasks have produced nothing, True once output is queued, False at the end; a
    MaterializedDataset's blocks exist already, so always True."""
    import ray

    from torch_raydata.pipeline.source import EpochBlocks, RaySource

    ds = ray.data.range(4, override_num_blocks=2).map_batches(
        _wait_for_go_file, batch_size=None, fn_kwargs={"folder": str(tmp_path)}
    )
    blocks = EpochBlocks.start(ds, hold_bytes=None)
    try:
        stream = iter(blocks)
        assert not blocks.ready()  # both tasks wait for their go file: nothing to pull
        (tmp_path / "go-0").touch()
        deadline = time.monotonic() + 60  # detector, bounded: the first output is queued
        while not blocks.ready():
            assert time.monotonic() < deadline, "the first task's output never queued"
            time.sleep(0.01)
        first = next(stream)
        assert first.num_rows == 2
        (tmp_path / "go-2").touch()
        assert sum(sb.num_rows for sb in stream) == 2
        assert not blocks.ready()
    finally:
        (tmp_path / "go-0").touch()
        (tmp_path / "go-2").touch()
        blocks.close()

    served = RaySource(ray.data.range(100, override_num_blocks=4).materialize()).open()
    try:
        assert served.ready()
        assert sum(sb.num_rows for sb in served) == 100 and served.ready()
    finally:
        served.close()


def test_ready_while_slices_of_the_current_bundle_are_left():
    """A bundle of several blocks: every slice but its last is handed on without a pull
    from Ray (``ready``), whatever Ray's queue holds."""
    from types import SimpleNamespace as NS

    from torch_raydata.pipeline.source import EpochBlocks

    def bundle(n):
        md = NS(num_rows=10, size_bytes=80)
        return NS(blocks=[NS(ref=f"r{i}", metadata=md) for i in range(n)], slices=None)

    blocks = EpochBlocks(iter([bundle(3), bundle(1)]), executor=None)
    seen = []
    for sb in blocks:
        seen.append((sb.ref, blocks.ready()))
    assert seen == [("r0", True), ("r1", True), ("r2", False), ("r0", False)]


@ray_session
def test_prestarted_epochs_are_exact_and_shuffle_like_started_ones():
    """Same rows once per epoch, and the same per-epoch order as without prestart (the
    stream is ordered, so the shuffle's input is the same)."""
    kw = dict(batch_size=32, shuffle_buffer_size=200, shuffle_seed=7, preserve_order=True)
    on = trd.RayIterableDataset(_streamed(), **kw)
    off = trd.RayIterableDataset(_streamed(), prestart=False, **kw)
    for epoch in range(3):
        a, b = _ids(on), _ids(off)
        assert sorted(a) == list(range(600)) and a == b
        assert on.stats().prestarted == (epoch > 0)
        assert not off.stats().prestarted
    assert on.stats().next_epoch_prestarted and not off.stats().next_epoch_prestarted
    assert on.stats().prestart_lead_seconds is not None
    assert on.stats().epoch_start_seconds is not None
    first = _ids(on)
    on.set_epoch(1)  # the stream does not depend on the epoch; the shuffle does
    assert _ids(on) != first and sorted(_ids(on)) == list(range(600))
    on.close()
    off.close()
    assert not on.stats().next_epoch_prestarted


@ray_session
def test_time_counts_from_iter():
    ds = trd.RayIterableDataset(_streamed(), batch_size=50, prestart=False)
    t0 = time.perf_counter()
    it = iter(ds)
    next(it)
    elapsed = time.perf_counter() - t0
    st = ds.stats()
    # The first batch cannot come before the first block, and both are measured from
    # iter(), so together they cover what the caller waited (the executor's start too).
    assert st.epoch_start_seconds is not None
    assert st.epoch_start_seconds <= st.time_to_first_batch <= elapsed
    assert "after iter()" in str(st)
    it.close()
    ds.close()


@ray_session
def test_close_and_gc_tear_the_prestarted_stream_down():
    ds = trd.RayIterableDataset(_streamed(), batch_size=64)
    assert len(_ids(ds)) == 600
    nxt = ds._next
    assert nxt.pending
    stream = nxt._slot
    ds.close()
    assert not nxt.pending and stream._executor is None and nxt.discarded == 1
    ds2 = trd.RayIterableDataset(_streamed(), batch_size=64)
    assert len(_ids(ds2)) == 600
    nxt2 = ds2._next
    stream2 = nxt2._slot
    assert nxt2.pending
    del ds2
    gc.collect()
    assert not nxt2.pending and stream2._executor is None  # closed with its owner


@ray_session
def test_prestarted_stream_is_held_to_the_prefetch_window():
    """The next epoch's executor starts no new task once the prefetch window's bytes wait
    for it: its output stays near the window however long the step takes to ask."""
    width = 64 * 1024  # 64 KiB rows
    ds = trd.RayIterableDataset(
        _streamed(n=400, blocks=100, width=width), batch_size=8, prefetch_batches=2
    )
    assert len(_ids(ds)) == 400
    stream = ds._next._slot
    hold = stream._hold.budget
    assert hold is not None and 16 * width <= hold <= 17 * width  # 16 window rows
    topology = stream._executor._topology
    deadline = time.monotonic() + 60
    # Wait (bounded) until the prestarted executor has produced and then settled: output
    # waiting for us and no task running.
    while time.monotonic() < deadline and not (
        ds.stats().next_epoch_bytes > 0 and not any(op.num_active_tasks() for op in topology)
    ):
        time.sleep(0.05)
    queued = ds.stats().next_epoch_bytes
    block = 4 * width  # 4 rows per block
    assert 0 < queued <= hold + 2 * block  # the hold plus what two CPUs had in flight
    assert queued < 100 * block / 4  # far from the whole epoch
    assert len(_ids(ds)) == 400  # and the held epoch runs whole
    ds.close()


@ray_session
def test_resume_discards_the_prestart_and_stays_exact():
    from torch_raydata.pipeline.source import teardown_counts

    kw = dict(batch_size=25, shuffle_buffer_size=100, shuffle_seed=3, id_column="id")
    ds = trd.RayIterableDataset(_streamed(), **kw)
    assert len(_ids(ds)) == 600  # epoch 0; epoch 1 now prestarted
    assert ds._next.pending
    seen = []
    for i, b in enumerate(ds):  # epoch 1, cut short
        seen += [int(x) for x in b["id"]]
        if i == 4:
            break
    state = ds.state_dict()
    assert state["epoch"] == 1 and state["rows_consumed"] == 125
    before = teardown_counts()
    ds.close()
    fresh = trd.RayIterableDataset(_streamed(), **kw)
    fresh.load_state_dict(state)
    rest = _ids(fresh)
    assert sorted(seen + rest) == list(range(600))
    assert not fresh.stats().prestarted  # the resumed epoch ran its own, filtered stream
    assert teardown_counts()["cancelled"] == before["cancelled"]
    fresh.close()


@ray_session
def test_a_loaded_state_drops_a_prestarted_stream():
    ds = trd.RayIterableDataset(_streamed(), batch_size=50, id_column="id")
    assert len(_ids(ds)) == 600
    assert ds._next.pending
    ds.load_state_dict(ds.state_dict())  # between epochs: resume at the start of epoch 1
    assert not ds._next.pending and not ds.start_next_epoch()
    assert len(_ids(ds)) == 600
    ds.close()


@ray_session
def test_materialized_and_iterator_inputs_do_not_prestart():
    import ray

    mat = trd.RayIterableDataset(ray.data.range(100).materialize(), batch_size=10)
    shard = trd.RayIterableDataset(ray.data.range(100).iterator(), batch_size=10)
    for ds in (mat, shard):
        assert len(_ids(ds)) == 100 and len(_ids(ds)) == 100
        assert not ds._next.enabled and not ds.start_next_epoch()
        assert not ds.stats().prestarted
        ds.close()


@ray_session
def test_early_stop_lets_running_tasks_finish():
    """A break tears the executor down only once no task runs (nothing to cancel)."""
    from torch_raydata.pipeline.source import teardown_counts

    before = teardown_counts()
    ds = trd.RayIterableDataset(_streamed(n=2000, blocks=100), batch_size=10, prestart=False)
    for _ in range(3):
        for i, _b in enumerate(ds):
            if i == 1:
                break
    ds.close()
    after = teardown_counts()
    assert after["quiet"] - before["quiet"] >= 3
    assert after["cancelled"] == before["cancelled"]


@pytest.mark.slow
def test_many_early_stops_never_kill_the_process():
    """The stress script breaks out of 30 streamed epochs while tasks complete; before
    the quiet teardown this aborted the process from C++ now and then (see
    tests/scripts/early_stop_stress.py)."""
    script = Path(__file__).parent / "scripts" / "early_stop_stress.py"
    proc = subprocess.run(
        [sys.executable, str(script), "30"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK 30" in proc.stdout and "cancelled=0" in proc.stdout, proc.stdout[-2000:]
    assert "ray_cancels=0" in proc.stdout, proc.stdout[-2000:]


@ray_session
def test_a_failing_epoch_keeps_no_next_epoch():
    def broken(table):
        if table.num_rows and table.column("id")[0].as_py() >= 300:
            # Detector: fail only once the next epoch was prestarted (the one-block stream
            # ends while this epoch runs), so the test always covers its discard.
            for _ in range(3000):
                if ds._next.started:
                    break
                threading.Event().wait(0.01)
            raise RuntimeError("bad batch")
        return {"id": table.column("id").to_numpy()}

    ds = trd.RayIterableDataset(_streamed(blocks=1), batch_size=50, collate_fn=broken,
                                preserve_order=True)
    with pytest.raises(RuntimeError, match="bad batch"):
        for _ in ds:
            pass
    assert ds._next.started == 1  # the one-block stream had ended: it was prestarted
    assert not ds._next.pending and ds._next.discarded == 1
    ds.close()


def _parquet(tmp_path, files: int = 3, rows: int = 40) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in range(files):
        ids = np.arange(f * rows, (f + 1) * rows)
        pq.write_table(pa.table({"id": ids, "x": ids * 3}), tmp_path / f"part-{f}.parquet")
    return str(tmp_path)


@ray_session
def test_file_listing_is_made_once_and_epochs_stay_exact(tmp_path):
    """Ray 2.60 lists a read_parquet's files at every execution (32 actors per epoch);
    the source lists once and every epoch's copy reads from that listing."""
    import ray
    from ray.data._internal.logical.operators import InputData, ListFiles

    ds = ray.data.read_parquet(_parquet(tmp_path)).map_batches(lambda b: b)
    loader = trd.RayIterableDataset(ds, batch_size=16, shuffle_buffer_size=50, shuffle_seed=1)
    for _ in range(3):
        assert sorted(_ids(loader)) == list(range(120))
    src = loader._prestart_source
    assert isinstance(src._listing, list) and src._listing
    ops = list(src._listed(ds)._logical_plan.dag.post_order_iter())
    assert any(isinstance(op, InputData) for op in ops)
    assert not any(isinstance(op, ListFiles) for op in ops)
    assert any(isinstance(op, ListFiles) for op in ds._logical_plan.dag.post_order_iter())
    loader.close()

    shuffled = ray.data.read_parquet(_parquet(tmp_path), shuffle="files")
    loader = trd.RayIterableDataset(shuffled, batch_size=16)
    for _ in range(2):
        assert sorted(_ids(loader)) == list(range(120))
    assert loader._prestart_source._listing is False  # a new file order every epoch
    loader.close()


@ray_session
def test_blocks_hold_about_a_batch_once_the_row_size_is_known():
    """Epoch 0 asks Ray for 8 MiB blocks at most; later epochs for about one batch."""
    from torch_raydata.pipeline.constants import TRAINING_BLOCK_BYTES

    width = 256 * 1024  # 256 KiB rows: a batch of 64 is 16 MiB
    for prestart in (True, False):
        ds = trd.RayIterableDataset(
            _streamed(n=256, blocks=2, width=width), batch_size=64, prestart=prestart
        )
        src = ds._prestart_source
        assert src.block_bytes == TRAINING_BLOCK_BYTES
        assert len(_ids(ds)) == 256
        blocks_first = ds.stats().blocks
        assert len(_ids(ds)) == 256
        assert 64 * width <= src.block_bytes <= 65 * width
        assert ds.stats().blocks < blocks_first  # fewer, batch-sized blocks
        ds.close()


def _manifest_rows(listing) -> list[tuple]:
    import pyarrow as pa

    table = pa.concat_tables([t for t, _, _ in listing])
    assert sum(md.num_rows for _, md, _ in listing) == table.num_rows
    return sorted(tuple(str(v) for v in row.values()) for row in table.to_pylist())


@ray_session
@pytest.mark.parametrize("layout", ["flat", "row_groups", "hive", "columns"])
def test_in_process_listing_equals_rays(tmp_path, layout):
    """A few files are listed in this process (no 32 footer-reading actors): the manifest
    must be the one Ray's own listing makes, whatever the layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.data._internal.logical.operators import ListFiles

    from torch_raydata.pipeline import source_listing as listing

    kwargs = {}
    if layout == "flat":
        _parquet(tmp_path, files=5)
        (tmp_path / "_DONE").write_text("")  # not parquet: filtered out by extension
    elif layout == "row_groups":
        ids = np.arange(1000)
        pq.write_table(pa.table({"id": ids, "x": ids}), tmp_path / "a.parquet", row_group_size=90)
        pq.write_table(pa.table({"id": ids + 1000, "x": ids}), tmp_path / "b.parquet",
                       row_group_size=400)
    elif layout == "hive":
        for part in range(3):
            (tmp_path / f"p={part}").mkdir()
            ids = np.arange(part * 10, part * 10 + 10)
            pq.write_table(pa.table({"id": ids}), tmp_path / f"p={part}" / "f.parquet")
    else:
        _parquet(tmp_path, files=2)
        kwargs = {"columns": ["id"]}
    ds = ray.data.read_parquet(str(tmp_path), **kwargs)
    (op,) = [o for o in ds._logical_plan.dag.post_order_iter() if isinstance(o, ListFiles)]
    local = listing.list_in_process(ds, op)
    assert local is not None, "the in-process listing did not apply (Ray's listing changed?)"
    assert _manifest_rows(local) == _manifest_rows(listing.list_with_ray(ds, op))
    loader = trd.RayIterableDataset(ds, batch_size=64)
    want = sorted(ray.data.read_parquet(str(tmp_path), **kwargs).to_pandas()["id"].tolist())
    assert sorted(_ids(loader)) == want
    assert loader._prestart_source._listing and sorted(_ids(loader)) == want
    loader.close()


@ray_session
def test_many_files_are_listed_by_ray(tmp_path, monkeypatch):
    """Past LOCAL_LISTING_MAX_FILES, Ray's footer-reading actors list (once)."""
    import ray

    from torch_raydata.pipeline import source_listing as listing

    monkeypatch.setattr(listing, "LOCAL_LISTING_MAX_FILES", 2)
    calls = []
    real = listing.list_with_ray
    monkeypatch.setattr(listing, "list_with_ray", lambda *a: calls.append(1) or real(*a))
    loader = trd.RayIterableDataset(ray.data.read_parquet(_parquet(tmp_path)), batch_size=16)
    for _ in range(2):
        assert sorted(_ids(loader)) == list(range(120))
    assert calls == [1] and loader._prestart_source._listing
    loader.close()
