"""Exact resume at scale (issue 17): the consumed set kept compressed on its own thread,
per-rank parts, the chunked cluster-side filter, and states saved before all this.

Stage tests without Ray except where the object store is the point (``ray_session``).
Sizes are 10M IDs where scale matters; no timing assertions (benchmarks/resume_scale.py
measures the costs).
"""

from __future__ import annotations

import gc
import os
import pickle
import threading
import weakref

import numpy as np
import pytest

import torch_raydata as trd
from torch_raydata.kernels.ids import bitmap_mask
from torch_raydata.pipeline.consumer import EpochProgress
from torch_raydata.resume import ConsumedSet, ResumeState, merge_states, part_state
from torch_raydata.resume import filter as resume_filter
from torch_raydata.resume.consumed import _LAZY_KEYS, RECENT_BATCHES, _bitmap

HERE = os.path.dirname(__file__)
FINGERPRINT = {"batch_size": 4, "shuffle_seed": 0, "id_column": "id", "columns": None,
               "num_rows": None}


def _keys(ids) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).view(np.uint64)


# -- the recording set ------------------------------------------------------------------------
def test_recording_set_folds_on_its_own_thread_joined_by_close():
    s = ConsumedSet.recording()
    s.add(_keys(np.arange(0, 100)))
    s.add(_keys(np.arange(500, 600)))
    threads = [t for t in threading.enumerate() if t.name == "trd-consumed"]
    assert len(threads) == 1
    s.close()
    assert not threads[0].is_alive()
    assert s.sorted_keys().tolist() == list(range(100)) + list(range(500, 600))
    s.add(_keys([7000]))  # after close: kept, folded by the reader, no thread restarted
    assert len(s) == 201 and not [t for t in threading.enumerate() if t.name == "trd-consumed"]


def test_snapshot_leaves_the_last_lag_batches_out_and_keeps_them():
    s = ConsumedSet.recording()
    for b in range(5):
        s.add(_keys(np.arange(10 * b, 10 * b + 10)))
    blob, count = s.snapshot(lag=2)
    assert count == 30
    assert ConsumedSet.decode({"format": "roaring64", "bytes": blob}).sorted_keys().tolist() == list(
        range(30)
    )
    assert len(s) == 50  # the held-back batches are still in the set
    with pytest.raises(ValueError, match="lag=17"):
        s.snapshot(lag=RECENT_BATCHES + 1)
    s.close()


def test_batches_are_not_kept_beyond_the_last_few():
    """No 8-byte-per-ID buffer lives for the epoch: once folded, a batch's key array is
    dropped as soon as RECENT_BATCHES newer batches came."""
    s = ConsumedSet.recording()
    first = _keys(np.arange(1000))
    ref = weakref.ref(first)
    s.add(first)
    del first
    for b in range(1, RECENT_BATCHES + 1):
        s.add(_keys(np.arange(1000 * b, 1000 * b + 1000)))
    assert len(s) == 1000 * (RECENT_BATCHES + 1)  # read: everything queued is folded
    gc.collect()
    assert ref() is None
    s.close()


def test_repeats_are_counted_also_against_an_included_set():
    s = ConsumedSet.recording()
    s.add(_keys([1, 2, 3]))
    s.add(_keys([3, 4]))
    assert s.repeats == 1
    t = ConsumedSet.recording()
    loaded = ConsumedSet(ConsumedSet.decode(s.encode()).bitmap())
    t.include(loaded)
    t.add(_keys([4, 9]))
    assert t.repeats == 1 and len(t) == 5
    s.close()
    t.close()


def test_a_failing_fold_reaches_the_reader_with_its_type_and_message(monkeypatch):
    failed = threading.Event()

    def boom(self, item):
        failed.set()
        raise MemoryError("no room for the bitmap")

    monkeypatch.setattr(ConsumedSet, "_fold", boom)
    s = ConsumedSet.recording()
    s.add(_keys(range(_LAZY_KEYS)))  # enough keys for the thread to fold them
    assert failed.wait(30)
    s.close()
    with pytest.raises(RuntimeError, match="MemoryError: no room for the bitmap"):
        s.snapshot()
    with pytest.raises(RuntimeError, match="trd-consumed"):
        s.add(_keys([2]))


def test_ten_million_random_ids_round_trip_and_stay_compact():
    rng = np.random.default_rng(0)
    keys = rng.permutation(20_000_000)[:10_000_000].astype(np.uint64)
    s = ConsumedSet.recording()
    for i in range(0, len(keys), 100_000):
        s.add(keys[i : i + 100_000])
    enc = s.encode()
    s.close()
    assert enc["count"] == 10_000_000
    # A bit per ID of the range (2.5 MB) in the set's serialized pieces, plus the keys
    # added since they were made, serialized as they came (~2.2 bytes per scattered key;
    # this producer does not wait for the thread, so up to max(4 MiB, the pieces) more).
    assert len(pickle.dumps(enc)) < (5 << 20) + (4 << 20)
    back = ConsumedSet.decode(enc).sorted_keys()
    assert np.array_equal(back, np.sort(keys))


# -- chunks and the shared set ----------------------------------------------------------------
def test_chunks_cover_the_set_exactly_within_the_target():
    rng = np.random.default_rng(1)
    ids = np.concatenate([rng.choice(4_000_000, 300_000, replace=False),
                          np.arange(10**9, 10**9 + 500_000)])  # dense + a far run
    s = ConsumedSet()
    s.add(_keys(ids))
    chunks = s.chunks(16 << 10)
    assert len(chunks) > 4
    from pyroaring import BitMap64

    union = BitMap64()
    prev_stop = 0
    for start, stop, blob in chunks:
        assert start >= prev_stop and start % (1 << 16) == 0 and stop % (1 << 16) == 0
        part = BitMap64.deserialize(blob)
        assert part.min() >= start and part.max() < stop
        assert len(blob) <= max(16 << 10, 8300)  # one container may exceed the target
        union |= part
        prev_stop = stop
    assert union == s.bitmap()


@pytest.mark.usefixtures("ray_session")
def test_shared_set_reads_only_the_chunks_of_a_blocks_range_within_its_cache(monkeypatch):
    rng = np.random.default_rng(2)
    n = 2_000_000
    consumed = rng.permutation(n)[: n // 2]
    s = ConsumedSet()
    s.add(_keys(consumed))
    budget = 64 << 10
    monkeypatch.setattr(resume_filter, "WORKER_CACHE_BYTES", budget)
    monkeypatch.setattr(resume_filter, "_CACHE", resume_filter._ChunkCache())
    shared = resume_filter.SharedConsumedSet.put(s, chunk_bytes=16 << 10)
    assert shared.num_chunks > 8 and shared.count == n // 2
    cache = resume_filter._CACHE
    bm = s.bitmap()
    # A block of consecutive IDs (no global shuffle): only its own chunk(s) are read.
    for start in (0, 700_000, 1_500_000):
        ids = _keys(np.arange(start, start + 8192))
        touching = int(np.sum((shared.starts <= ids.max()) & (shared.stops > ids.min())))
        before = cache.loads
        cache.clear()
        assert np.array_equal(shared.mask(ids), bitmap_mask(bm, ids))
        assert cache.loads - before == touching <= 2
    # A shuffled block spans every chunk: still exact, the cache stays within its budget.
    ids = _keys(rng.permutation(n)[:20_000])
    assert np.array_equal(shared.mask(ids), bitmap_mask(bm, ids))
    assert cache.peak_bytes <= budget and cache.loads > shared.num_chunks // 2


# -- per-rank parts ----------------------------------------------------------------------------
def _progress(epoch: int, keys: np.ndarray, batch: int) -> EpochProgress:
    """An epoch's record after the training step received ``keys`` in batches."""
    p = EpochProgress(epoch, record_ids=True)
    for i in range(0, len(keys), batch):
        part = keys[i : i + batch]
        p.consumed.add(part)
        p.batches_yielded += 1
        p.rows_yielded += len(part)
        p.recent_rows.append(len(part))
    return p


def _state(resume: ResumeState, progress: EpochProgress, rank: int, world: int) -> dict:
    return resume.state_dict(
        progress, next_epoch=progress.epoch + 1, consumer_lag=0, id_column="id",
        batch_size=4, fingerprint=FINGERPRINT, world_size=world, spill_dir=None, rank=rank,
    )


def _resumed(state: dict, rank: int, spill_dir: str | None = None) -> ResumeState:
    r = ResumeState()
    r.load(state, fingerprint=FINGERPRINT, id_column="id", search_dir=spill_dir)
    return r


def test_ten_million_ids_resume_two_ranks_to_one_and_one_to_two_exactly(tmp_path):
    """2 ranks save parts at 10M consumed IDs of 20M -> 1 rank resumes, consumes half of
    the rest and saves a single state -> 2 ranks resume from it, consume the rest and
    save parts again: the final set is every ID, each consumed once (the loaded set is
    carried by rank 0 alone, so the ranks' states never repeat it)."""
    n = 20_000_000
    order = (np.arange(n, dtype=np.uint64) * np.uint64(7_654_321)) % np.uint64(n)  # scattered
    ranks = [order[0 : n // 2 : 2], order[1 : n // 2 : 2]]  # 5M each, interleaved
    states = []
    for r in range(2):
        p = _progress(0, ranks[r], 65_536)
        states.append(part_state(_state(ResumeState(), p, r, 2), str(tmp_path), r, 2))
        p.close()
    merged = merge_states(states)
    assert merged["consumed"]["format"] == "roaring64-parts"
    assert merged["consumed"]["count"] == merged["rows_consumed"] == n // 2
    assert all(os.path.dirname(q["path"]) == str(tmp_path) for q in merged["consumed"]["parts"])

    one = _resumed(merged, 0)  # 2 -> 1
    assert one.count == n // 2
    left = order[n // 2 :]
    assert one.consumed.bitmap() == ConsumedSet(_bitmap(order[: n // 2])).bitmap()
    p = _progress(0, left[: n // 4], 65_536)
    one.attach(p, rank=0)
    single = _state(one, p, 0, 1)
    p.close()
    assert single["consumed"]["count"] == single["rows_consumed"] == 3 * n // 4

    rest = left[n // 4 :]  # 1 -> 2: the rest split afresh
    states = []
    for r in range(2):
        resume = _resumed(single, r)
        p = _progress(0, rest[r::2], 65_536)
        resume.attach(p, rank=r)
        states.append(part_state(_state(resume, p, r, 2), str(tmp_path), r, 2))
        p.close()
    final = merge_states(states)
    assert final["rows_consumed"] == final["consumed"]["count"] == n
    done = _resumed(final, 0).consumed
    assert len(done) == n and done.bitmap().min() == 0 and done.bitmap().max() == n - 1


def test_parts_that_repeat_an_id_or_are_missing_are_clear_errors(tmp_path):
    def rank_state(ids, rank):
        p = _progress(0, _keys(ids), 2)
        s = part_state(_state(ResumeState(), p, rank, 2), str(tmp_path / "a"), rank, 2)
        p.close()
        return s

    merged = merge_states([rank_state([1, 2, 3], 0), rank_state([3, 4], 1)])
    with pytest.raises(ValueError, match="1 IDs were consumed on more than one rank"):
        ConsumedSet.decode(merged["consumed"])
    ok = merge_states([rank_state([1, 2], 0), rank_state([5], 1)])
    moved = tmp_path / "moved"
    os.rename(tmp_path / "a", moved)
    with pytest.raises(ValueError, match="cannot be read"):
        _resumed(ok, 0)
    # The checkpoint directory moved: found by name in the loader's spill_dir.
    assert _resumed(ok, 0, spill_dir=str(moved)).consumed.sorted_keys().tolist() == [1, 2, 5]


def test_a_loaded_state_is_carried_by_rank_zero_only():
    base = _progress(0, _keys(np.arange(100)), 10)
    loaded = _state(ResumeState(), base, 0, 1)
    base.close()
    states = []
    for r in range(2):
        resume = _resumed(loaded, r)
        states.append(resume.state_dict(  # loaded, epoch not started yet
            None, next_epoch=0, consumer_lag=0, id_column="id", batch_size=4,
            fingerprint=FINGERPRINT, world_size=2, spill_dir=None, rank=r,
        ))
    merged = merge_states(states)  # no "consumed on more than one rank"
    assert merged["consumed"]["count"] == merged["rows_consumed"] == 100


# -- states saved before issue 17 ---------------------------------------------------------------
@pytest.mark.usefixtures("ray_session")
def test_a_state_saved_before_the_compressed_set_resumes_exactly():
    """tests/data/state_v2_before_issue17.pkl: states written by the previous version
    (ConsumedSet with a lazily built bitmap): a single-process one after 10 batches of 32
    and a 2-rank merged one; both load and resume exactly."""
    import ray

    with open(os.path.join(HERE, "data", "state_v2_before_issue17.pkl"), "rb") as f:
        saved = pickle.load(f)
    yielded = saved["yielded"]
    for key in ("single", "merged_two_ranks"):
        ds = ray.data.range(1000, override_num_blocks=5)
        loader = trd.RayIterableDataset(
            ds, batch_size=32, id_column="id", shuffle_buffer_size=200, shuffle_seed=0
        )
        loader.load_state_dict(saved[key])
        assert loader.state_dict()["consumed"]["count"] == 320
        rest = np.concatenate([b["id"].numpy() for b in loader])
        both = np.concatenate([yielded, rest])
        assert len(both) == len(np.unique(both)) == 1000, key
        loader.close()
