"""A recording consumed set keeps no bitmap of the whole set (issue 17, peak memory): it
is its serialized key-range pieces plus a small bitmap of the keys since, and the thread
remakes a piece from its old bytes and the keys since in its range. These tests pin that
the structure stays exact: states at arbitrary points (also while the thread is between
two pieces), decode equal to the keys added, counts and repeats, piece splits, the switch
to a live bitmap for scattered keys. Stage tests without Ray; no timing."""

from __future__ import annotations

import array
import pickle
import threading

import numpy as np
import pytest
from pyroaring import BitMap64

from torch_raydata.resume import ConsumedSet
from torch_raydata.resume import consumed as consumed_mod
from torch_raydata.resume import pieces as pieces_mod
from torch_raydata.resume.pieces import count_in, slice_of

_TOP = 1 << 64


def _bm(keys) -> BitMap64:
    return BitMap64(array.array("Q", np.unique(np.asarray(keys, dtype=np.uint64)).tobytes()))


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 2 KiB and a merge every 2K keys: many pieces, split and remade often."""
    monkeypatch.setattr(pieces_mod, "PIECE_BYTES", 2 << 10)
    monkeypatch.setattr(consumed_mod, "_FRESH_KEYS", 2048)


def _check(s: ConsumedSet, added: list[np.ndarray], lag: int = 0) -> None:
    """A state of ``s`` decodes to the distinct keys added (less the last ``lag`` batches)
    and carries their count."""
    held = np.concatenate(added[len(added) - lag :]) if lag else np.empty(0, np.uint64)
    expect = np.setdiff1d(np.concatenate(added), held)
    enc = pickle.loads(pickle.dumps(s.encode(lag=lag)))
    assert enc["count"] == len(expect)
    assert np.array_equal(ConsumedSet.decode(enc).sorted_keys(), expect)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_adds_stay_exact_at_arbitrary_points(seed):
    """Random batches (dense, scattered over a wide range, runs, keys at 0 and 2^64 - 1,
    repeats within the set only when asked) with states, lengths and lags taken at random
    points, wherever the thread is."""
    rng = np.random.default_rng(seed)
    s = ConsumedSet.recording()
    added: list[np.ndarray] = []
    pool = rng.permutation(1 << 22).astype(np.uint64)  # every key distinct
    at = 0
    for _ in range(120):
        kind = rng.integers(4)
        n = int(rng.integers(1, 3000))
        if kind == 0:  # a shuffle's share: scattered over the range
            b = pool[at : at + n]
            at += n
        elif kind == 1:  # a run of consecutive IDs, far above the others
            start = (1 << 40) + int(rng.integers(0, 1 << 30))
            b = np.arange(start, start + n, dtype=np.uint64)
            b = np.setdiff1d(b, np.concatenate(added)) if added else b
        elif kind == 2:  # the extremes of the key space
            b = np.setdiff1d(np.array([0, 1, _TOP - 2, _TOP - 1], np.uint64),
                             np.concatenate(added) if added else np.empty(0, np.uint64))
        else:  # another dense share, in the order it came
            b = pool[at : at + n]
            at += n
        if not len(b):
            continue
        b = rng.permutation(b)
        s.add(b)
        added.append(b)
        if rng.random() < 0.15:
            _check(s, added, lag=int(rng.integers(0, min(4, len(added)) + 1)))
        if rng.random() < 0.1:
            assert len(s) == len(np.unique(np.concatenate(added))) and s.repeats == 0
    s.close()
    _check(s, added)
    _check(s, added, lag=3)
    assert s.known_repeats == 0 and s.repeats == 0
    with s._bm_lock:  # the pieces are the set: no whole-set bitmap kept
        assert s._bitmap is None and len(s._pieces.blobs()) > 4
    assert s.bitmap() == _bm(np.concatenate(added))


@pytest.mark.usefixtures("small_pieces")
def test_states_taken_while_the_thread_is_between_two_pieces(monkeypatch):
    """The thread merges the keys since into the pieces one piece per hold of the lock: a
    state (and a length) taken between two pieces is exact, and keys added meanwhile are
    kept apart from the ones being merged."""
    paused, resume = threading.Event(), threading.Event()
    real = ConsumedSet._merge_piece
    calls = []

    def merge_piece(self, i):
        calls.append(i)
        if len(calls) == 3 and threading.current_thread().name == "trd-consumed":
            paused.set()
            self._bm_lock.release()  # a reader may take the lock while the thread waits
            try:
                assert resume.wait(30)
            finally:
                self._bm_lock.acquire()
        return real(self, i)

    keys = np.random.default_rng(7).permutation(1 << 21)[:400_000].astype(np.uint64)
    s = ConsumedSet.recording()
    batches = np.array_split(keys, 40)
    added = []
    for b in batches[:30]:
        s.add(b)
        added.append(b)
    assert s.encode()["count"] == 300_000  # pieces made here
    monkeypatch.setattr(ConsumedSet, "_merge_piece", merge_piece)
    for b in batches[30:35]:  # past the merge threshold: the thread starts a merge
        s.add(b)
        added.append(b)
    assert paused.wait(30)
    with s._bm_lock:
        assert s._merging is not None and s._stale is not None  # mid-merge
    s.add(batches[35])
    s.add(batches[30][:50])  # repeats of keys being merged, and of keys in the pieces
    s.add(batches[0][:20])
    added.append(batches[35])
    # Repeats of keys in the pieces are found by len() (a state's count before that is
    # above its keys: test_a_repeat_not_yet_found_fails_the_load_not_the_resume).
    assert len(s) == 360_000 and s.repeats == 70
    _check(s, added)
    resume.set()
    for b in batches[36:]:
        s.add(b)
        added.append(b)
    s.close()
    _check(s, added)
    assert len(s) == 400_000 and s.repeats == 70


def test_a_repeat_not_yet_found_fails_the_load_not_the_resume(monkeypatch):
    """A key repeated across the boundary of the pieces (a non-unique id_column) is found
    when the thread next merges, or by len()/repeats; a state taken before that carries a
    count above its keys, and loading it is a clear error (never a wrong resume)."""
    s = ConsumedSet.recording()
    s.add(np.arange(0, 10_000, dtype=np.uint64))
    assert s.encode()["count"] == 10_000  # pieces made
    s.add(np.arange(9_990, 10_010, dtype=np.uint64))  # 10 repeats of keys in the pieces
    assert s.known_repeats == 0  # cheap: not checked against the pieces yet
    enc = s.encode()
    assert enc["count"] == 10_020
    with pytest.raises(ValueError, match="expected count=10020.*not unique"):
        ConsumedSet.decode(enc)
    assert s.repeats == 10 and s.known_repeats == 10  # checked now, and kept
    enc = s.encode()
    assert enc["count"] == 10_010 and len(ConsumedSet.decode(enc)) == 10_010
    s.close()


@pytest.mark.usefixtures("small_pieces")
def test_merges_find_repeats_against_the_pieces():
    """The thread's merge counts a key already in a piece once: its count reaches the
    state without a check on the caller's thread."""
    keys = np.random.default_rng(8).permutation(1 << 20)[:50_000].astype(np.uint64)
    s = ConsumedSet.recording()
    s.add(keys)
    assert s.encode()["count"] == 50_000
    s.add(keys[:5000])  # repeats, past the merge threshold
    s.close()
    with s._bm_lock:
        s._fold_queued()
    s._refresh()  # what the thread does past the threshold (unless it did already)
    with s._bm_lock:
        assert len(s._small) == 0 and s._merging is None
    assert s.known_repeats == 5000 and s.encode()["count"] == 50_000


@pytest.mark.parametrize("dense_at", [0, 1 << 63])
def test_scattered_keys_after_pieces_switch_to_a_live_bitmap(monkeypatch, dense_at):
    """A set that turns scattered (hashed IDs after dense ones, below or above them)
    keeps a live bitmap from then on, exact across the switch."""
    monkeypatch.setattr(consumed_mod, "_FRESH_KEYS", 1024)
    dense = np.arange(dense_at, dense_at + 20_000, dtype=np.uint64)
    hashed = np.random.default_rng(9).integers(1 << 40, 1 << 62, 100_000, dtype=np.uint64)
    s = ConsumedSet.recording()
    s.add(dense)
    assert s.encode()["count"] == 20_000
    s.add(hashed[:50_000])
    s.add(dense[:7])  # repeats
    s.add(hashed[50_000:])
    s.close()
    with s._bm_lock:
        s._fold_queued()
    s._refresh()  # what the thread does past the threshold (unless it did already)
    with s._bm_lock:
        assert s._pieces.scattered and s._bitmap is not None and s._merging is None
    assert len(s) == len(np.unique(np.concatenate([dense, hashed]))) and s.repeats == 7
    _check(s, [dense, hashed])
    assert s.known_repeats == 7


def test_an_included_set_is_merged_into_the_pieces_exactly():
    s = ConsumedSet.recording()
    s.add(np.arange(0, 5000, dtype=np.uint64))
    assert s.encode()["count"] == 5000
    s.include(ConsumedSet(_bm(np.arange(4000, 9000))))
    s.add(np.arange(9000, 9100, dtype=np.uint64))
    assert s.repeats == 1000 and len(s) == 9100
    _check(s, [np.arange(9100, dtype=np.uint64)])
    s.close()


@pytest.mark.parametrize("keys", [
    np.arange(0, 300_000, 3, dtype=np.uint64),
    np.array([0, 5, 1 << 16, (1 << 33) + 1, (1 << 63) + 7, _TOP - 2, _TOP - 1], np.uint64),
    np.random.default_rng(10).integers(0, _TOP - 1, 2000, dtype=np.uint64),
])
def test_slice_of_is_the_keys_of_a_range(keys):
    bm = _bm(keys)
    u = np.unique(keys)
    for a, b in [(0, _TOP), (0, 1 << 16), (1 << 16, 1 << 34), (3 << 16, _TOP), (_TOP - (1 << 16), _TOP),
                 (int(u[len(u) // 2]) >> 16 << 16, _TOP)]:
        want = u[(u >= a) & (u < b)] if b < _TOP else u[u >= a]
        assert count_in(bm, a, b) == len(want)
        got = slice_of(bm, a, b)
        assert np.array_equal(np.frombuffer(got.to_array(), np.uint64), want)
    assert bm == _bm(keys)  # untouched


@pytest.mark.parametrize("recording", [False, True])
def test_a_run_up_to_the_last_key_is_kept(recording):
    """int64 IDs -300,000 .. -1 viewed as uint64: a run ending at 2^64 - 1 (a range's
    stop is a uint64, so 2^64 is never passed to pyroaring)."""
    s = ConsumedSet.recording() if recording else ConsumedSet()
    top = np.arange(-100, 0, dtype=np.int64).view(np.uint64)
    below = np.arange(-300_000, -200, dtype=np.int64).view(np.uint64)
    s.add(top)
    s.add(below)
    assert len(s) == 299_900
    s._refresh()  # pieces, as the set's thread makes them
    s.add(np.array([5], np.uint64))
    _check(s, [top, below, np.array([5], np.uint64)])
    s.close()
