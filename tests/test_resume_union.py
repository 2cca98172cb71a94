"""The consumed set's union encoding (issue 17): key-range pieces serialized ahead of time
by the set's thread, the keys added since as blobs of their own, the last batches as a
blob to subtract; round trips, mixing with the single-blob form of earlier states, spilled
files and parts, and corrupt input. Stage tests without Ray."""

from __future__ import annotations

import array
import pickle
import threading

import numpy as np
import pytest
from pyroaring import BitMap64

from torch_raydata.resume import ConsumedSet, merge_states, part_state
from torch_raydata.resume import consumed as consumed_mod
from torch_raydata.resume import pieces as pieces_mod
from torch_raydata.resume.pieces import portable

STATE = {"version": 2, "epoch": 0, "batches_consumed": 1, "rows_consumed": 0, "batch_size": 4,
         "exact": True, "world_size": 1, "fingerprint": {"id_column": "id"}}


def _bm(keys) -> BitMap64:
    return BitMap64(array.array("Q", np.sort(np.asarray(keys, dtype=np.uint64)).tobytes()))


@pytest.mark.parametrize("keys", [
    np.arange(7, 8, dtype=np.uint64),  # one key
    np.random.default_rng(0).choice(1 << 24, 200_000, replace=False).astype(np.uint64),  # arrays
    np.arange(70_000, 200_000, 2, dtype=np.uint64),  # > 4096 keys per container: bitsets
    np.array([0, 1 << 32, (1 << 33) + 5, (1 << 63) + 9, (1 << 64) - 1], dtype=np.uint64),
])
def test_numpy_serialization_is_pyroarings_format(keys):
    keys = np.unique(keys)
    assert BitMap64.deserialize(portable(keys)) == _bm(keys)


def _recorded(batches: list[np.ndarray]) -> ConsumedSet:
    s = ConsumedSet.recording()
    for b in batches:
        s.add(b)
    return s


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 4 KiB and a refresh every 4K keys: many pieces, remade often."""
    monkeypatch.setattr(pieces_mod, "PIECE_BYTES", 4 << 10)
    monkeypatch.setattr(consumed_mod, "_FRESH_KEYS", 4096)


@pytest.mark.usefixtures("small_pieces")
def test_states_taken_while_the_thread_remakes_its_pieces_are_exact():
    rng = np.random.default_rng(1)
    order = rng.permutation(400_000).astype(np.uint64)
    s = ConsumedSet.recording()
    for i, b in enumerate(np.array_split(order, 100)):
        s.add(b)
        if i % 7 == 3:  # wherever the thread is: the state is the set so far
            enc = s.encode()
            assert ConsumedSet.decode(enc).bitmap() == _bm(order[: 4000 * (i + 1)])
    s.close()
    enc = s.encode()
    assert isinstance(enc["bytes"], list) and len(enc["bytes"]) > 4
    back = ConsumedSet.decode(pickle.loads(pickle.dumps(enc)))
    assert back.bitmap() == _bm(order) and enc["count"] == len(order)


@pytest.mark.usefixtures("small_pieces")
def test_the_last_batches_are_subtracted_and_kept():
    batches = [np.arange(1000 * b, 1000 * b + 1000, dtype=np.uint64) * 3 for b in range(40)]
    s = _recorded(batches)
    enc = s.encode(lag=3)
    assert enc["count"] == 37_000 and "minus" in enc
    assert ConsumedSet.decode(enc).bitmap() == _bm(np.concatenate(batches[:37]))
    assert len(s) == 40_000  # still in the set
    s.close()


@pytest.mark.usefixtures("small_pieces")
def test_union_states_merge_with_single_blob_states_and_spill(tmp_path):
    a = _recorded([np.arange(0, 500_000, 2, dtype=np.uint64)])
    a.close()
    new = dict(STATE, consumed=a.encode(lag=0))
    old = dict(STATE, consumed={"format": "roaring64", "bytes": _bm([1, 3, 5]).serialize(),
                                "count": 3})  # as every state before the union form
    merged = ConsumedSet.decode(merge_states([new, old])["consumed"])
    assert merged.bitmap() == _bm(np.concatenate([np.arange(0, 500_000, 2), [1, 3, 5]]))
    # Spilled: the blobs back to back in one file, their sizes in the state.
    spilled = a.encode(spill_dir=str(tmp_path), max_inline_bytes=100)
    assert "path" in spilled and len(spilled["sizes"]) > 1 and "bytes" not in spilled
    assert ConsumedSet.decode(spilled).bitmap() == a.bitmap()
    # Parts: each rank's union in its file, with sizes and the subtracted batches.
    b = _recorded([np.arange(1, 40_001, 2, dtype=np.uint64), np.array([99_999], np.uint64)])
    parts = [part_state(dict(STATE, consumed=s.encode(lag=lag)), str(tmp_path), r, 2)
             for r, (s, lag) in enumerate([(a, 0), (b, 1)])]
    b.close()
    enc = merge_states(parts)["consumed"]
    assert enc["format"] == "roaring64-parts" and "minus" in enc["parts"][1]
    both = np.concatenate([np.arange(40_000), np.arange(40_000, 500_000, 2)])
    assert ConsumedSet.decode(enc).bitmap() == _bm(both)


def test_corrupt_or_foreign_union_input_is_a_clear_error(tmp_path):
    good = _bm(range(10)).serialize()
    cases = [
        ({"format": "roaring64", "bytes": [good, "abc"], "count": 10}, "'bytes' holds a str"),
        ({"format": "roaring64", "bytes": [good, b"xx"], "count": 10}, "2 bytes in 'bytes'"),
        ({"format": "roaring64", "bytes": [good], "minus": b"x", "count": 9}, "in 'minus'"),
        ({"format": "roaring64", "bytes": [good], "count": 11}, "expected count=11"),
    ]
    for enc, match in cases:
        with pytest.raises(ValueError, match=match):
            ConsumedSet.decode(enc)
    s = ConsumedSet(_bm(range(0, 300_000, 3)))
    monkey = pytest.MonkeyPatch()
    monkey.setattr(pieces_mod, "PIECE_BYTES", 4 << 10)
    try:
        s._refresh()  # pieces, as a recording set's thread makes them
        spilled = s.encode(spill_dir=str(tmp_path), max_inline_bytes=10)
    finally:
        monkey.undo()
    spilled["sizes"] = spilled["sizes"][:-1]
    with pytest.raises(ValueError, match=r"sizes=.* do not split the .* bytes of"):
        ConsumedSet.decode(spilled)


def test_scattered_keys_are_one_blob_and_exact():
    """Hashed string IDs: a container per key; not cut into pieces (a range would span
    billions of empty containers), encoded as one blob."""
    keys = np.random.default_rng(3).integers(0, 2**64 - 1, 50_000, dtype=np.uint64)
    s = _recorded([keys[:25_000], keys[25_000:]])
    enc = s.encode(lag=1)
    s.close()
    assert ConsumedSet.decode(enc).bitmap() == _bm(keys[:25_000])
    assert s._pieces.scattered and isinstance(enc["bytes"], list) and len(enc["bytes"]) == 1


def test_scattered_keys_are_one_chunk_for_the_filter():
    """Hashed string IDs used to hang chunks() (a range bitmap over ~2^64 keys)."""
    from torch_raydata.resume import hash_strings

    s = ConsumedSet()
    s.add(hash_strings([f"id{i}" for i in range(1000)]))
    chunks = s.chunks(1 << 20)
    assert len(chunks) == 1 and BitMap64.deserialize(chunks[0][2]) == s.bitmap()


def test_scattered_batches_wait_in_a_small_bitmap_and_repeats_count_once():
    """A rank's share of a global shuffle (a few keys per container of a set still in
    array containers) is not merged into the set batch by batch (O(the set) each) but
    gathered in a small bitmap kept disjoint from it; counts, repeats and states stay
    exact across the two."""
    keys = np.random.default_rng(2).choice(1 << 26, 60_000, replace=False).astype(np.uint64)
    s = ConsumedSet.recording()
    for b in np.array_split(keys, 20):
        s.add(b)
    s.add(keys[:10])  # repeats within the small bitmap
    assert len(s) == 60_000 and s.repeats == 10 and s.known_repeats == 10
    with s._bm_lock:  # below the refresh threshold: nothing merged into the pieces yet
        assert s._pieces.blobs() == [] and len(s._small) == 60_000
    assert len(s.bitmap()) == 60_000
    assert s.encode()["count"] == 60_000  # no pieces yet: made here
    with s._bm_lock:
        assert len(s._small) == 0 and s._pieces.blobs()
    s.add(keys[10:20])  # repeats of keys now in the pieces, folded into the small bitmap
    s.add(np.array([(1 << 26) + 1], dtype=np.uint64))
    assert s.known_repeats == 10  # not yet checked against the pieces
    assert len(s) == 60_001 and s.repeats == 20 and s.known_repeats == 20  # len() checks
    enc = s.encode()
    assert enc["count"] == 60_001
    assert ConsumedSet.decode(pickle.loads(pickle.dumps(enc))).bitmap() == _bm(
        np.append(keys, (1 << 26) + 1)
    )
    s.include(ConsumedSet(_bm([5, (1 << 26) + 2])))  # a loaded set, while keys wait
    s.add(np.array([(1 << 26) + 2, (1 << 26) + 3], dtype=np.uint64))
    expect = set(keys.tolist()) | {5, (1 << 26) + 1, (1 << 26) + 2, (1 << 26) + 3}
    assert len(s) == len(expect) and s.encode()["count"] == len(expect)
    s.close()
    assert set(s.sorted_keys().tolist()) == expect


def test_a_backlog_is_folded_in_groups_bounded_by_keys():
    """Queued batches folded together are sorted in one array (8 bytes per key, three
    times over): a backlog is taken at most _GROUP_KEYS keys at a time past the first."""
    import collections

    big = consumed_mod._GROUP_KEYS
    q = collections.deque(consumed_mod._Batch(np.arange(n, dtype=np.uint64))
                          for n in (big // 3, big // 3, big // 3, big // 3, 5))
    assert [len(b.keys) for b in consumed_mod._take_group(q)] == [big // 3] * 3
    q.appendleft(consumed_mod._Batch(np.arange(2 * big, dtype=np.uint64)))
    assert [len(b.keys) for b in consumed_mod._take_group(q)] == [2 * big]  # one, however large
    assert [len(b.keys) for b in consumed_mod._take_group(q)] == [big // 3, 5]


def test_a_states_blobs_are_united_smallest_first(monkeypatch):
    """The keys added since the pieces were made are scattered over every container:
    united with each other before the large pieces, not merged into them blob by blob."""
    from torch_raydata.resume import blobs as blobs_mod

    keys = np.random.default_rng(3).choice(1 << 24, 330_000, replace=False).astype(np.uint64)
    s = ConsumedSet()  # no thread: folded when read
    s.add(keys[:300_000])
    assert len(s) == 300_000
    s._refresh()  # the pieces, as the set's thread makes them
    for b in np.array_split(keys[300_000:], 3):  # then batches, each serialized alone
        s.add(b)
        assert len(s) > 0
    enc = s.encode()
    assert isinstance(enc["bytes"], list) and len(enc["bytes"]) >= 4
    seen = []
    real = blobs_mod._deserialize
    monkeypatch.setattr(blobs_mod, "_deserialize", lambda b, k: seen.append(len(b)) or real(b, k))
    assert ConsumedSet.decode(enc).bitmap() == _bm(keys)
    # the largest piece is the union to be; the small blobs, smallest first, after it
    assert seen[0] == max(seen) and seen[1:] == sorted(seen[1:]) and len(set(seen)) > 1


def test_the_thread_gathers_scattered_batches_before_folding(monkeypatch):
    """While the set's containers are arrays, the thread folds once _LAZY_KEYS keys are
    queued (each pyroaring call costs per container touched: a few keys per container
    per batch would pay it per key); what is still queued is folded by a reader."""
    folds, folded = [], threading.Event()
    real = ConsumedSet._fold

    def spy(self, items):
        folds.append(sum(len(i.keys) for i in items))
        real(self, items)
        folded.set()

    monkeypatch.setattr(ConsumedSet, "_fold", spy)
    lazy = consumed_mod._LAZY_KEYS
    keys = np.random.default_rng(4).choice(1 << 26, lazy + 4000, replace=False).astype(np.uint64)
    waited = threading.Event()

    class Condition(threading.Condition):
        def wait(self, timeout=None):
            waited.set()  # the thread looked at the queue and waits
            return super().wait(timeout)

    s = ConsumedSet.recording()
    s._cv = Condition()
    batches = np.array_split(keys, 14)
    s.add(batches[0])  # starts the thread
    assert waited.wait(30)
    for b in batches[1:]:
        s.add(b)
    assert folded.wait(30)
    s.close()
    assert folds == [len(keys)]  # one fold of the 14 batches, none before
    s.add(keys[:10])
    assert len(s) == len(keys) and s.repeats == 10


def test_parts_are_united_straight_into_the_union_and_stay_exact(tmp_path, monkeypatch):
    """A part without a minus is united straight into the union (no copy of the part
    first: 8 ranks' parts at 100M IDs are 200 MB); one with a minus is decoded alone;
    repeats across parts and a part holding fewer keys than its count are errors."""
    from torch_raydata.resume import blobs as blobs_mod

    rng = np.random.default_rng(5)
    keys = rng.permutation(1 << 20)[:300_000].astype(np.uint64)
    states = []
    for rank, share in enumerate(np.array_split(keys, 3)):
        s = ConsumedSet()
        s.add(share[:80_000])
        assert len(s) == 80_000
        s._refresh()  # pieces made (as by the set's thread), then batches since
        for b in np.array_split(share[80_000:], 3):
            s.add(b)
            assert len(s) > 0
        enc = s.encode(lag=1) if rank == 2 else s.encode()
        states.append(part_state(dict(STATE, consumed=enc), str(tmp_path), rank, 3))
    merged = merge_states(states)
    into = []
    real = blobs_mod.decode_one
    monkeypatch.setattr(blobs_mod, "decode_one", lambda e, d, **kw: (
        into.append(kw.get("into") is not None) or real(e, d, **kw)))
    held = np.array_split(keys, 3)[2][80_000:]
    held = np.array_split(held, 3)[2]  # rank 2's last batch: left out (lag=1)
    expect = np.setdiff1d(keys, held)
    assert ConsumedSet.decode(merged["consumed"]).bitmap() == _bm(expect)
    assert into == [True, True, False]
    monkeypatch.undo()
    dup = merge_states([states[0], states[0]])
    with pytest.raises(ValueError, match="consumed on more than one rank"):
        ConsumedSet.decode(dup["consumed"])
    short = dict(merged["consumed"], parts=[dict(p) for p in merged["consumed"]["parts"]])
    short["parts"][0]["count"] += 1
    with pytest.raises(ValueError):
        ConsumedSet.decode(short)


def test_a_set_without_a_thread_encodes_as_one_blob(monkeypatch):
    """No thread keeps a merged or loaded set's pieces up to date: it is one serialization
    (cutting it into pieces first made the merge of 8 ranks at 10M twice as slow)."""
    monkeypatch.setattr(pieces_mod, "PIECE_BYTES", 4 << 10)
    keys = np.arange(0, 900_000, 3, dtype=np.uint64)
    enc = ConsumedSet(_bm(keys)).encode()
    assert isinstance(enc["bytes"], bytes) and enc["count"] == len(keys)
    sets = [_recorded([k]) for k in (keys[::2], keys[1::2])]
    a, b = (dict(STATE, consumed=s.encode()) for s in sets)
    for s in sets:
        s.close()
    merged = merge_states([a, b])["consumed"]
    assert isinstance(merged["bytes"], bytes)
    assert ConsumedSet.decode(merged).bitmap() == _bm(keys)


def test_gathered_ranks_are_united_straight_into_the_union(monkeypatch):
    """merge_states unites each gathered rank's set straight into the union (no decoded
    copy of each rank first); a rank with a minus is decoded alone; repeats are errors."""
    from torch_raydata.resume import merge as merge_mod

    keys = np.random.default_rng(6).permutation(1 << 20)[:200_000].astype(np.uint64)
    sets = [_recorded(np.array_split(k, 4)) for k in np.array_split(keys, 2)]
    states = [dict(STATE, consumed=s.encode(lag=1 if i else 0)) for i, s in enumerate(sets)]
    for s in sets:
        s.close()
    into = []
    real = merge_mod.decode_one
    monkeypatch.setattr(merge_mod, "decode_one", lambda e, d, **kw: (
        into.append(kw.get("into") is not None) or real(e, d, **kw)))
    merged = merge_states(states)["consumed"]
    held = np.array_split(np.array_split(keys, 2)[1], 4)[3]
    assert ConsumedSet.decode(merged).bitmap() == _bm(np.setdiff1d(keys, held))
    assert into == [True]  # rank 1 has a minus: decoded alone
    with pytest.raises(ValueError, match="consumed on more than one rank"):
        merge_states([states[0], states[0]])
