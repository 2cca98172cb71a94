"""The consumed set's union encoding (issue 17): key-range pieces serialized ahead of time
by the set's thread, the keys added since as blobs of their own, the last batches as a
blob to subtract; round trips, mixing with the single-blob form of earlier states, spilled
files and parts, and corrupt input. Stage tests without Ray."""

from __future__ import annotations

import array
import pickle

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
