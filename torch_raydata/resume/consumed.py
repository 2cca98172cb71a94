"""The consumed-ID set: the IDs of rows *yielded to the training step* in one epoch
(never the prefetched or collated-and-waiting ones), kept compressed as it grows.

Owns recording keys (an O(1) append on the step's thread; a thread, ``trd-consumed``,
folds them into the set and keeps its serialized pieces up to date), states for a
checkpoint, set algebra and key-range chunks for the cluster-side filter. Does not own
the ID keys (``kernels.ids``), the encodings (``blobs.py``), the pieces (``pieces.py``),
the filter (``filter.py``), merging ranks (``merge.py``) or when state is taken
(``state.py``).

Compact form: a 64-bit roaring bitmap (``pyroaring.BitMap64``, CRoaring); numpy sorted
runs, the alternative weighed, need 400 MB for 100M IDs drawn at random from 200M where
the bitmap needs 25 MB. A recording set keeps no bitmap of the whole set: it is its
serialized key-range pieces (``pieces.py``) plus a small bitmap of the keys folded since
the thread last merged them into the pieces (a piece is remade from its old bytes and
the keys since in its range: one piece's bitmap live at a time). Peak memory is then ~1x
the state plus the keys since, where a live bitmap beside its pieces was 2x plus the
allocator's slack (measured at 100M random, 1 rank: 58-60 MiB of peak growth against
83-88 with the live bitmap, for a 24-27 MiB state; goal 72.4: docs/scale.md).
The price: a key repeated across that boundary (a non-unique ``id_column``) is found when
the thread next merges (or by ``len()``/``repeats``, which check on the caller's thread),
not by ``known_repeats``, which ``state_dict`` reads; a state taken in between holds a
count above its keys and its load fails (``blobs.decode_one``), never a wrong resume.
Any other set (loaded, merged, or a recording set whose keys are scattered) keeps the
live bitmap, as before. pyroaring holds the GIL in every call, and a thread the OS
preempts while holding it stalls the training step until it runs again (measured: a
1.4 ms ``|=`` took 104 ms of wall time on 2 loaded cores). So the thread sorts with numpy
(off the GIL), serializes batches with numpy and hands pyroaring ~1 ms calls, adds runs
as ranges (no ``run_optimize`` of the whole set), and serializes in ~1 MiB pieces; a
state references the pieces and the batches serialized since (``encode``). Measured:
benchmarks/RESULTS_resume.md, docs/scale.md.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from .blobs import check_parts, decode_one, decode_parts, encode_blobs, read_blob, write_blob
from .pieces import (
    Pieces,
    chunks_of,
    count_in,
    distinct,
    fold_sorted,
    nbytes,
    portable,
    since_of,
    slice_of,
    unite,
)
from .pieces import bitmap_of as _bitmap

__all__ = ["ConsumedSet", "check_parts", "read_blob", "write_blob"]

#: Keys added to the bitmap per pyroaring call (it holds the GIL for the whole call: 64K
#: scattered keys are ~1 ms on this machine).
_FOLD_KEYS = 1 << 16
#: Keys added since the pieces were made above which the thread makes them again (or a
#: 64th of the set if more): what a ``state_dict()`` serializes on the step's thread.
_FRESH_KEYS = 1 << 18
#: Serialized batches since the pieces were made above which the thread unites them
#: into one blob (a state of fewer, larger blobs decodes faster).
_FRESH_BLOBS = 8
#: Queued batches the thread folds together at most, and their keys at most (past one
#: batch): a backlog folded in one go is sorted in one array, 8 bytes per key, three times
#: over (concatenated, sorted, made distinct), so the group is bounded by keys too (a
#: backlog of 64 batches of 100K keys was ~150 MiB of transient arrays at 100M random).
_GROUP = 64
_GROUP_KEYS = 1 << 18
#: Keys queued before the thread folds them while the set's containers are arrays: each
#: pyroaring call costs per container it touches (~0.2-0.4 us: allocate, look up, merge),
#: and a rank's share of a global shuffle has a few keys per container per batch (12.5K
#: keys over 3,052 containers at 100M random, 8 ranks); gathered, a call costs per ~20.
#: A ``state_dict()`` folds what is queued (at most this many keys: a few ms). Fewer
#: when the set has fewer containers: ~16 keys per container its last fold touched.
_LAZY_KEYS = 1 << 16
_LAZY_PER_CONTAINER = 16

#: Batches whose keys a recording set keeps as they came, so a state can leave the last
#: ``lag`` of them out (``EpochProgress.rows_consumed`` keeps as many row counts).
RECENT_BATCHES = 16


def _keys_of(item: Any) -> int:
    """Keys of a queued item: a batch's (0 once folded) or an included bitmap's."""
    if isinstance(item, _Batch):
        return len(item.keys) if isinstance(item.keys, np.ndarray) else 0
    return max(len(item), _LAZY_KEYS)


def _take_group(queue: collections.deque[Any]) -> list[Any]:
    """The queued items folded together next (caller holds the queue's lock): at most
    ``_GROUP`` and, past the first, at most ``_GROUP_KEYS`` keys."""
    items, keys = [], 0
    while queue and len(items) < _GROUP:
        item = queue[0]
        n = len(item.keys) if isinstance(item, _Batch) and isinstance(item.keys, np.ndarray) else 0
        if items and keys + n > _GROUP_KEYS:
            break
        items.append(queue.popleft())
        keys += n
    return items


class _Batch:
    """One batch's keys: the array as added, then (once folded) serialized pieces."""

    __slots__ = ("keys",)

    def __init__(self, keys: np.ndarray) -> None:
        self.keys: Any = keys


class ConsumedSet:
    """A set of row IDs (uint64 keys), kept compressed.

    ``add()`` only queues the keys; a recording set (``ConsumedSet.recording()``) folds
    them into the bitmap on a background thread, started at the first ``add()`` and
    joined by ``close()``, which also keeps the set's serialized pieces up to date; any
    other set folds them when it is next read. ``encode()`` is what a checkpoint takes on
    the training step's thread: the keys still queued (normally none or one batch) are
    folded there, then only the keys added since the pieces were made are serialized.
    """

    def __init__(self, bitmap: Any = None, *, background: bool = False) -> None:
        # The set's live bitmap; None for a recording set (the pieces are the set, below).
        self._bitmap = bitmap if bitmap is not None or background else _bitmap()
        # Keys folded but not yet in _bitmap or the pieces (disjoint from _bitmap and from
        # _merging; against the pieces, checked when merged into them): see _fold.
        self._small = _bitmap()
        # Without a live bitmap: the keys a refresh is merging into the pieces (from
        # _merge_at on, _merging_left of them, not yet in the pieces) and the count of
        # the keys in the pieces.
        self._merging: Any = None
        self._merging_left = 0
        self._merge_at = 0
        self._in_pieces = 0
        self._defer = True  # fold into _small (the set's containers are arrays)
        self._lazy_keys = _LAZY_KEYS  # keys queued before the thread folds (if _defer)
        self._bm_lock = threading.Lock()  # the bitmap, the pieces and the fold
        self._cv = threading.Condition()  # the queue, the thread's state
        self._queue: collections.deque[Any] = collections.deque()
        self._queued_keys = 0
        # The last batches' keys (for ``encode(lag)``): raw until folded, then serialized.
        self._recent: collections.deque[_Batch] = collections.deque(maxlen=RECENT_BATCHES)
        self._background = background
        self._thread: threading.Thread | None = None
        self._closed = False
        self._error: BaseException | None = None
        self.added = 0  # keys passed to add(), repeats included
        self._expected = len(bitmap) if bitmap is not None else 0  # if none repeated
        # The set = the pieces' blobs | _stale | _fresh: _fresh holds the keys added since
        # the pieces were last brought up to date (serialized, each with its distinct
        # key >> 16, None: any), _stale (while they are) the ones before.
        self._pieces = Pieces()
        self._fresh: list[tuple[bytes, np.ndarray | None]] = []
        self._fresh_keys = 0
        self._stale: list[tuple[bytes, np.ndarray | None]] | None = None

    @classmethod
    def recording(cls) -> ConsumedSet:
        """A set for an epoch's consumer: folds on its own thread (``close()`` joins it)."""
        return cls(background=True)

    # -- recording (training step's thread) ------------------------------------------------
    def add(self, keys: np.ndarray) -> None:
        """Queue one batch's keys (O(1): the array is kept as is until it is folded)."""
        self._raise_error()
        keys = np.asarray(keys)
        with self._cv:
            batch = _Batch(keys)
            self._queue.append(batch)
            self._recent.append(batch)
            self._queued_keys += len(keys)
            self.added += len(keys)
            self._expected += len(keys)
            if self._background and not self._closed:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._compact, name="trd-consumed", daemon=True
                    )
                    self._thread.start()
                self._cv.notify()

    def include(self, other: ConsumedSet | Any) -> None:
        """Queue the whole of ``other`` (a set or a BitMap64), e.g. a resumed epoch's
        loaded set: folded like a batch (on the background thread for a recording set)."""
        bm = other.bitmap() if isinstance(other, ConsumedSet) else other
        with self._cv:
            self._queue.append(bm)
            self._queued_keys += max(len(bm), _LAZY_KEYS)  # folded without waiting
            self._expected += len(bm)
            if self._thread is not None:
                self._cv.notify()

    def close(self) -> None:
        """Stop and join the background thread (keys still queued are folded on the next
        read, by the reader). Idempotent."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _compact(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and (
                        not self._queue or (self._defer and self._queued_keys < self._lazy_keys)
                    ):
                        self._cv.wait()
                    if self._closed:
                        return
                with self._bm_lock:  # popped under the bitmap's lock: a snapshot sees it
                    with self._cv:  # a backlog is folded together (one sort, few calls)
                        items = _take_group(self._queue)
                        self._queued_keys = 0 if not self._queue else max(
                            0, self._queued_keys - sum(map(_keys_of, items))
                        )
                    if items:
                        self._fold(items)
                items = []  # not kept alive while waiting for the next batch
                if self._fresh_keys >= self._refresh_at():
                    self._refresh()
                elif self._bitmap is not None and len(self._small) >= self._refresh_at():
                    with self._bm_lock:
                        self._flush()
                elif len(self._fresh) > _FRESH_BLOBS:
                    self._unite_fresh()
        except BaseException as e:  # noqa: BLE001 - re-raised on the training step
            self._error = e

    def _fold(self, items: list[Any]) -> None:
        """Fold queued items into the bitmap (caller holds ``_bm_lock``): their keys
        together, then each batch still in the lag window serialized on its own."""
        batches = []
        for item in items:
            if isinstance(item, _Batch):
                if isinstance(item.keys, np.ndarray):  # else folded already
                    batches.append(item)
                continue
            if self._bitmap is not None:
                self._flush()
                self._bitmap |= item  # a BitMap64 (include)
            else:  # disjoint from _merging, as a batch's keys
                self._small |= item
                if self._merging is not None and self._small.intersection_cardinality(self._merging):
                    self._small -= self._merging
            if not self._pieces.scattered:
                self._fresh.append((item.serialize(), None))
                self._fresh_keys += len(item)
        if not batches:
            return
        raw = [b.keys.astype(np.uint64, copy=False) for b in batches]
        k = distinct(raw[0] if len(raw) == 1 else np.concatenate(raw))  # numpy: off the GIL
        # A batch scattered over containers that are arrays (a rank's share of a global
        # shuffle: 12.5K keys over 3,052 containers, ~4 keys each) costs a merge of every
        # array it touches, O(the set) per batch: such batches go into a small bitmap
        # (disjoint from the set) merged into it once per refresh (measured at 100M random,
        # 8 ranks: 463 ns/ID folding into the set, the small bitmap of an earlier version
        # 157). Into bitsets (dense sets) a key costs the same either way: folded directly.
        # Without a live bitmap, into the small one, kept disjoint from the keys a refresh
        # is merging (not from the pieces: checked when merged into them).
        into = self._small if self._defer or self._bitmap is None else self._bitmap
        other = self._small if into is self._bitmap else (
            self._bitmap if self._bitmap is not None else self._merging
        )
        pieces = fold_sorted(k, into, _FOLD_KEYS, other)
        touched = sum(len(ck) for _, ck in pieces)
        self._lazy_keys = min(_LAZY_KEYS, max(1024, _LAZY_PER_CONTAINER * touched))
        if not self._pieces.scattered:
            self._fresh += pieces
            self._fresh_keys += len(k)
        if len(batches) == 1:
            batches[0].keys = [blob for blob, _ in pieces]  # the raw array goes
            return
        with self._cv:  # add() appends to it under _cv
            recent = {id(b) for b in self._recent}
        for b, keys in zip(batches, raw, strict=True):
            keep = id(b) in recent and len(keys)
            b.keys = [portable(distinct(keys))] if keep else []

    def _flush(self) -> None:
        """The small bitmap into the set's live bitmap (caller holds ``_bm_lock``; none
        for a set without one: the small bitmap is merged into the pieces)."""
        if self._bitmap is not None and len(self._small):
            self._bitmap |= self._small
            self._small = _bitmap()
            # Serialized size, computed (O(containers)): 2 bytes per key in arrays,
            # 1/8 byte in full bitsets.
            self._defer = self._bitmap.__sizeof__() > len(self._bitmap)

    def _refresh(self) -> None:
        """Bring the serialized pieces up to date, one piece per hold of the lock (the
        set's thread; a state taken meanwhile is the pieces | _stale | _fresh)."""
        if self._bitmap is None:
            with self._bm_lock:
                self._begin_merge()
            i = 0
            while True:  # to the end even if closed: the keys are in no piece yet
                with self._bm_lock:
                    if self._merging is None or i >= len(self._pieces.ranges):
                        break
                    i = self._merge_piece(i)
            with self._bm_lock:
                self._end_merge()
            return
        with self._bm_lock:
            self._flush()
            self._stale = (self._stale or []) + self._fresh
            self._fresh, self._fresh_keys = [], 0
            since = since_of(self._stale)
        i = 0
        while True:  # to the end even if closed: a split piece is made whole
            with self._bm_lock:
                if self._pieces.scattered or i >= len(self._pieces.ranges):
                    break
                stale = self._pieces.stale(i, since)
                i = self._pieces.make(i, self._bitmap) if stale else i + 1
        with self._bm_lock:
            self._stale = None
            if self._pieces.scattered:
                self._fresh, self._fresh_keys = [], 0

    # -- without a live bitmap: the small bitmap merged into the pieces --------------------
    def _begin_merge(self) -> None:
        """The small bitmap becomes the keys to merge (caller holds ``_bm_lock``)."""
        self._merging, self._small = self._small, _bitmap()
        self._merging_left, self._merge_at = len(self._merging), 0
        self._stale = (self._stale or []) + self._fresh
        self._fresh, self._fresh_keys = [], 0

    def _merge_piece(self, i: int) -> int:
        """Piece ``i`` remade from its bytes and the keys to merge in its range (if any;
        caller holds ``_bm_lock``). Returns the index of the next piece. Keys already in
        the piece are repeats: the piece's count grows by the others only."""
        from pyroaring import BitMap64

        a, b, blob, before = self._pieces.ranges[i]
        m = self._merging
        n = count_in(m, a, b)
        if n == 0 and blob is not None:
            self._merge_at = b
            return i + 1
        bm = BitMap64.deserialize(blob) if blob else _bitmap()
        if n:
            bm |= slice_of(m, a, b, n)
        j = self._pieces.make(i, bm)
        if self._pieces.scattered:  # a container per key: the live bitmap, as before
            self._to_live(bm)
            return j
        self._in_pieces += len(bm) - before
        self._merging_left -= n
        self._merge_at = b
        return j

    def _end_merge(self) -> None:
        if self._bitmap is None:
            self._merging, self._merging_left, self._stale = None, 0, None
            # Serialized size against keys: 2 bytes per key in arrays, 1/8 in bitsets.
            self._defer = self._pieces.nbytes() > self._in_pieces

    def _to_live(self, live: Any) -> None:
        """The set as a live bitmap (scattered keys: caller holds ``_bm_lock``): ``live``
        (the keys of the piece being made, a bitmap of its own) united with the pieces
        and the keys being merged; the small bitmap stays, made disjoint from it."""
        from pyroaring import BitMap64

        for blob in self._pieces.blobs():
            live |= BitMap64.deserialize(blob)
        if self._merging is not None:
            live |= self._merging
        self._small -= live
        self._bitmap, self._merging, self._merging_left, self._stale = live, None, 0, None
        self._fresh, self._fresh_keys, self._in_pieces = [], 0, 0
        self._defer = live.__sizeof__() > len(live)  # as _flush

    def _verify(self) -> None:
        """Drop from the small and merging bitmaps the keys the pieces already hold
        (repeats), so that ``_count()`` is exact (caller holds ``_bm_lock``; deserializes
        every piece those keys touch, on the caller's thread)."""
        from pyroaring import BitMap64

        m = self._merging
        for a, b, blob, _ in self._pieces.ranges:
            todo = [x for x in (self._small, m if m is not None and a >= self._merge_at else None)
                    if x is not None and count_in(x, a, b)]
            if not blob or not todo:
                continue
            piece = BitMap64.deserialize(blob)
            for x in todo:
                if x.intersection_cardinality(piece):
                    dup = x & piece
                    x -= dup
                    if x is m:
                        self._merging_left -= len(dup)

    def _unite_fresh(self) -> None:
        """The serialized batches since the pieces were made, as one blob."""
        with self._bm_lock:
            self._fresh = [unite(self._fresh)]

    def _refresh_at(self) -> int:
        """Keys added since the pieces were made above which they are made again."""
        return max(_FRESH_KEYS, self._count() >> 6)

    def _fold_queued(self) -> None:
        """Fold everything queued, on the caller's thread (caller holds ``_bm_lock``)."""
        with self._cv:
            items = list(self._queue)
            self._queue.clear()
            self._queued_keys = 0
        self._fold(items)

    def _count(self) -> int:
        """Keys in the set (caller holds ``_bm_lock``; everything queued folded); without
        a live bitmap, less any repeats among the keys not yet merged into the pieces
        (exact after ``_verify``)."""
        if self._bitmap is None:
            return self._in_pieces + self._merging_left + len(self._small)
        return len(self._bitmap) + len(self._small)

    def _whole(self) -> Any:
        """The set as one bitmap (caller holds ``_bm_lock``; everything queued folded):
        the live one, or, without it, one built from the pieces (a copy)."""
        from pyroaring import BitMap64

        if self._bitmap is not None:
            self._flush()
            return self._bitmap
        bm = self._small | self._merging if self._merging is not None else self._small.copy()
        for blob in self._pieces.blobs():
            bm |= BitMap64.deserialize(blob)
        return bm

    def _raise_error(self) -> None:
        if self._error is not None:
            e = self._error
            raise RuntimeError(
                f"the consumed-ID set's background thread (trd-consumed) failed: "
                f"{type(e).__name__}: {e}"
            ) from e

    # -- reading ---------------------------------------------------------------------------
    def bitmap(self) -> Any:
        """The set as a ``pyroaring.BitMap64`` (everything queued folded in first). Owned
        by the set: do not modify it while the set records. A recording set builds it
        from its pieces (a copy of the set, not updated by later keys)."""
        self._raise_error()
        with self._bm_lock:
            self._fold_queued()
            return self._whole()

    def __len__(self) -> int:
        """Keys in the set, exact: a recording set checks the keys not yet merged into
        its pieces against them here (deserializing the pieces they touch)."""
        self._raise_error()
        with self._bm_lock:  # not flushed: O(1) with a live bitmap
            self._fold_queued()
            if self._bitmap is None:
                self._verify()
            return self._count()

    @property
    def repeats(self) -> int:
        """Keys added (or included) more than once: a non-unique ``id_column``."""
        return self._expected - len(self)

    @property
    def known_repeats(self) -> int:
        """The repeats found so far, O(1): ``repeats``, except that a recording set finds
        a key repeated between the keys added since its pieces were last made and the
        pieces when its thread next makes them (``repeats`` checks now)."""
        self._raise_error()
        with self._bm_lock:
            self._fold_queued()
            return self._expected - self._count()

    def union(self, other: ConsumedSet) -> ConsumedSet:
        return ConsumedSet(self.bitmap() | other.bitmap())

    def sorted_keys(self) -> np.ndarray:
        """The set's uint64 keys in ascending order (e.g. to read which rows a checkpoint
        has consumed: integer IDs are the keys viewed as uint64)."""
        return np.frombuffer(self.bitmap().to_array(), dtype=np.uint64)

    def _held(self, lag: int) -> Any:
        """The keys of the last ``lag`` batches as a bitmap, or None (caller holds
        ``_bm_lock``; everything queued is folded)."""
        if lag > len(self._recent):
            raise ValueError(f"{lag=} is more than the {len(self._recent)} batches kept")
        if not lag:
            return None
        from pyroaring import BitMap64

        held = BitMap64()
        for batch in list(self._recent)[len(self._recent) - lag :]:
            for blob in batch.keys:
                held |= BitMap64.deserialize(blob)
        return held

    def snapshot(self, lag: int = 0) -> tuple[bytes, int]:
        """``(portable serialization, count)`` of the set without the keys of the last
        ``lag`` batches added (taken, not yet trained on), as one blob: a serialization
        of the whole set on the caller's thread (``encode`` is what a checkpoint takes).
        """
        self._raise_error()
        with self._bm_lock:
            self._fold_queued()
            whole = self._whole()
            held = self._held(lag)
            if held is not None:  # out for the serialization, back in after it
                whole -= held
            try:
                return whole.serialize(), len(whole)
            finally:
                if held is not None and whole is self._bitmap:
                    self._bitmap |= held

    def serialized(self) -> np.ndarray:
        """The roaring bitmap's portable serialization, as a uint8 array (for ray.put)."""
        return np.frombuffer(self.snapshot()[0], dtype=np.uint8)

    def chunks(self, target_bytes: int) -> list[tuple[int, int, bytes]]:
        """The set split by key range: ``(start, stop, portable bytes)`` per non-empty
        range, each at most ``target_bytes`` unless one 2^16-key container alone is
        larger (8 KiB at most). Ranges are disjoint, ascending and 2^16-aligned."""
        return chunks_of(self.bitmap(), target_bytes)

    # -- encoding --------------------------------------------------------------------------
    def encode(
        self, *, spill_dir: str | None = None, max_inline_bytes: int = 64 << 20, lag: int = 0
    ) -> dict:
        """The state's ``"consumed"`` entry (see ``blobs.py``): the set's serialized
        pieces as they are (made by the set's thread; on the caller's for a set without
        one), the keys added since serialized now, and the last ``lag`` batches' keys
        as the blob to subtract."""
        self._raise_error()
        with self._bm_lock:
            self._fold_queued()
            if self._bitmap is None and self._stale is None and (
                self._pieces.ranges[0][2] is None
                or nbytes(self._fresh) > max(4 << 20, self._pieces.nbytes())
            ):  # never made (before the thread's first refresh: at most _FRESH_KEYS keys),
                # or a backlog larger than the set's pieces (a thread far behind; 2.2 bytes
                # per scattered key against 1 bit per ID of the range): merged here
                self._begin_merge()
                i = 0
                while self._merging is not None and i < len(self._pieces.ranges):
                    i = self._merge_piece(i)
                self._end_merge()
            held = self._held(lag)
            count = self._count() - (len(held) if held is not None else 0)
            unmade = any(r[2] is None for r in self._pieces.ranges)
            if self._pieces.scattered or (unmade and self._bitmap is not None):
                # Scattered, or a set with a live bitmap and no pieces (a merged or loaded
                # set): no thread would keep pieces up to date, one serialization
                # (measured: a merge of 8 ranks' states at 10M random made pieces of the
                # union, 56 vs 22 ms).
                self._flush()
                blobs = [self._bitmap.serialize()]
            else:
                # The pieces (the set's keys when last made) and the keys added since,
                # serialized already.
                blobs = self._pieces.blobs() + [b for b, _ in (self._stale or []) + self._fresh]
            minus = held.serialize() if held is not None else None
        if not blobs:
            blobs = [_bitmap().serialize()]
        return encode_blobs(
            blobs, minus, count, spill_dir=spill_dir, max_inline_bytes=max_inline_bytes
        )

    @classmethod
    def decode(cls, enc: Any, *, search_dir: str | None = None) -> ConsumedSet:
        """The set of an encoding; a spilled file or part whose recorded path is gone is
        looked for by name in ``search_dir`` (e.g. a checkpoint directory moved since)."""
        fmt = enc.get("format") if isinstance(enc, dict) else None
        if fmt == "roaring64-parts":
            return cls._decode_parts(enc, search_dir)
        if fmt != "roaring64":
            raise ValueError(
                f"consumed-ID set must be a roaring64 or roaring64-parts encoding, got {enc!r:.120}"
            )
        return cls(decode_one(enc, search_dir))

    @classmethod
    def _decode_parts(cls, enc: dict, search_dir: str | None) -> ConsumedSet:
        return cls(decode_parts(enc, search_dir))  # checked there (repeats, count)
