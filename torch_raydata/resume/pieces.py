"""The consumed set's serialized copy of itself: key-range pieces of its bitmap, each
serialized ahead of time (by the set's thread), so that a checkpoint serializes only the
keys added since (``ConsumedSet.encode``).

Why pieces: every pyroaring call holds the GIL for its whole length, and a thread
holding the GIL that the OS preempts stalls the training step for as long as it is off
the CPU (measured at 100M random IDs: one 24 MiB ``serialize()`` is ~26 ms of CPU). A
piece of ~``PIECE_BYTES`` is one deserialization of its old bytes, a union with the keys
added to its range since, and one serialization (each ~0.2-1 ms); only the pieces whose
range received keys since are made again. Memory: for a recording set the pieces ARE the
set (no live bitmap of the whole set beside them: ``consumed.py``), so the set is ~1x its
compressed state plus the keys since and one piece's bitmap while it is made; a state
taken holds references to the pieces, not copies.

A set whose keys are scattered over the 64-bit space (hashed string IDs: a container per
key) is not cut: a range would span billions of empty containers; its ``encode`` is one
serialization on the caller's thread, as before.

Does not own the set, its lock or its threads (``consumed.py``).
"""

from __future__ import annotations

import array
from typing import Any

import numpy as np

__all__ = [
    "PIECE_BYTES", "Pieces", "bitmap_of", "chunks_of", "count_in", "distinct", "fold_sorted", "nbytes",
    "portable", "since_of", "slice_of", "unite",
]

#: Serialized bytes per piece (a piece of 2^16 keys' range may exceed it alone: 8 KiB).
PIECE_BYTES = 1 << 20
#: Bytes per key above which a set counts as scattered (dense or clustered keys: < 2).
_SCATTERED_BYTES_PER_KEY = 8
#: Keys a piece whose range spans a gap is copied key by key up to (else it is split).
_SLICE_KEYS = 4096
_TOP = 1 << 64


class Pieces:
    """Key ranges ``[start, stop)`` (2^16-aligned, disjoint, ascending, covering every
    key), each with its serialized keys (None where not yet made) and their count."""

    def __init__(self) -> None:
        self.ranges: list[list[Any]] = [[0, _TOP, None, 0]]
        self.scattered = False

    def blobs(self) -> list[bytes]:
        return [r[2] for r in self.ranges if r[2]]

    def nbytes(self) -> int:
        return sum(len(r[2]) for r in self.ranges if r[2])

    def stale(self, i: int, since: np.ndarray | None) -> bool:
        """Piece ``i`` is to be made (again): never made, or ``since`` (the sorted
        distinct ``key >> 16`` of the keys added after it was made; None: any key) has
        keys in its range."""
        a, b, blob, _ = self.ranges[i]
        if blob is None or since is None:
            return True
        j = int(np.searchsorted(since, a >> 16))
        return j < len(since) and int(since[j]) < -(-b >> 16)

    def make(self, i: int, bm: Any) -> int:
        """Make piece ``i`` from ``bm`` (the whole set, or any bitmap holding the keys of
        the piece's range; each pyroaring call bounded by the piece's size), splitting it
        first if too large (then every new piece is made, so that no key is
        ever out of the pieces and the set's fresh keys). Returns the index after it."""
        edges = self._split(i, bm)
        if edges is None:
            return i + 1
        self.ranges[i : i + 1] = [[x, y, None, 0] for x, y in zip(edges[:-1], edges[1:], strict=True)]
        j, end = i, i + len(edges) - 1
        while j < end and not self.scattered:
            nxt = self.make(j, bm)
            end += nxt - j - 1  # a piece split again
            j = nxt
        return j

    def _split(self, i: int, bm: Any) -> list[int] | None:
        """Make piece ``i`` and return None, or return the edges to split it at."""
        from pyroaring import BitMap64

        a, b, _, _ = self.ranges[i]
        n = count_in(bm, a, b)
        if n == 0:
            self.ranges[i][2:] = [b"", 0]
            return None
        size = bm.__sizeof__()  # its serialized size (computed, not serialized)
        if size > _SCATTERED_BYTES_PER_KEY * len(bm):
            self.scattered = True
            return None
        first = bm.next_set_bit(a) if a > 0 else bm.min()
        below = bm.rank(a - 1) if a > 0 else 0  # keys < a
        last = bm[below + n - 1]
        lo, hi = (first >> 16) << 16, ((last >> 16) + 1) << 16
        est = n * size / len(bm)
        span = (hi - lo) >> 16
        if (est > 2 * PIECE_BYTES or (span > 4 * n + 64 and n > _SLICE_KEYS)) and hi - lo > 1 << 16:
            ways = max(2, min(64, -(-int(est) // PIECE_BYTES)))
            cuts = sorted({(bm[below + n * j // ways] >> 16) << 16 for j in range(1, ways)})
            cuts = [c for c in cuts if a < c < b]
            if cuts:
                return [a, *cuts, b]
        if n == len(bm):  # the bitmap is the piece (made from the piece's keys alone)
            piece = bm
        elif span > 4 * n + 64:  # a few keys around a gap: copied key by key
            piece = bm[below : below + n]
        else:
            piece = bm & BitMap64(range(lo, min(hi, _TOP - 1)))
            if hi == _TOP and (_TOP - 1) in bm:
                piece.add(_TOP - 1)
        if n * 10 > (hi - lo) * 9:  # nearly full (e.g. every ID, in shuffled order): runs
            piece.run_optimize()  # (runs of added ranges are run containers already)
        self.ranges[i][2:] = [piece.serialize(), n]
        return None


def fold_sorted(
    k: np.ndarray, into: Any, step: int, other: Any = None
) -> list[tuple[bytes, np.ndarray]]:
    """Sorted, distinct uint64 keys into the bitmap ``into``; returns them serialized (in
    pieces of at most ``step``, each with its distinct ``key >> 16``). Runs of
    consecutive keys go in as ranges (run containers, a few bytes per run); scattered
    keys are serialized by numpy (``pieces.portable``) and read by pyroaring in one short
    call, ~5x less time holding the GIL than adding them. Keys already in ``other`` (a
    bitmap kept disjoint from ``into``) are left out of ``into``, not of the blobs."""
    from pyroaring import BitMap64

    out = []
    for i in range(0, len(k), step):
        part = k[i : i + step]
        high = part >> np.uint64(16)
        ck = high[np.concatenate([[True], high[1:] != high[:-1]])]
        cut = np.flatnonzero(np.diff(part) != 1) + 1
        if (len(cut) + 1) * 16 <= len(part):
            bm = BitMap64()
            starts = part[np.concatenate([[0], cut])].tolist()
            lasts = part[np.concatenate([cut - 1, [len(part) - 1]])].tolist()
            for a, z in zip(starts, lasts, strict=True):
                bm.add_range(a, min(z + 1, _TOP - 1))  # its stop is a uint64
            if lasts[-1] == _TOP - 1:
                bm.add(_TOP - 1)
            blob = bm.serialize()
        else:
            blob = portable(part)
            bm = BitMap64.deserialize(blob)
        if other is not None and len(other) and other.intersection_cardinality(bm):
            bm = bm - other  # repeats (a non-unique id_column): rare
        into |= bm
        out.append((blob, ck))
    return out


def chunks_of(bm: Any, target_bytes: int) -> list[tuple[int, int, bytes]]:
    """``ConsumedSet.chunks`` of the bitmap ``bm`` (run-optimized in place)."""
    from pyroaring import BitMap64

    if len(bm) == 0:
        return []
    bm.run_optimize()
    lo, hi = (bm.min() >> 16) << 16, ((bm.max() >> 16) + 1) << 16
    if bm.__sizeof__() > 8 * len(bm):  # scattered (hashed IDs): a range would span
        # billions of empty containers; one chunk (key 2^64 - 1 excluded: a uint64 stop)
        return [(lo, min(hi, (1 << 64) - 1), bm.serialize())]
    pieces = max(1, -(-bm.__sizeof__() // max(1, target_bytes)))  # serialized size
    step = max(1 << 16, (-(-(hi - lo) // pieces) >> 16) << 16)
    out: list[tuple[int, int, bytes]] = []
    todo = [(a, min(a + step, hi)) for a in range(lo, hi, step)][::-1]
    while todo:
        a, b = todo.pop()
        piece = bm & BitMap64(range(a, b))
        if len(piece) == 0:
            continue
        blob = piece.serialize()
        if len(blob) > target_bytes and b - a > 1 << 16:
            mid = a + (((b - a) >> 17) << 16)
            todo += [(mid, b), (a, mid)]
            continue
        out.append((a, b, blob))
    return out


def since_of(fresh: list[tuple[bytes, np.ndarray | None]]) -> np.ndarray | None:
    """The distinct ``key >> 16`` of serialized fresh keys (None: any)."""
    cks = [ck for _, ck in fresh]
    if any(ck is None for ck in cks):
        return None
    return distinct(np.concatenate(cks)) if cks else np.empty(0, np.uint64)


def distinct(k: np.ndarray) -> np.ndarray:
    """Sorted, distinct keys. Not ``np.unique``: on this numpy it took 1.5 ms for 12.5K
    uint64 keys against 0.07 ms for the sort it needs (a batch of a rank of 8 at 100M)."""
    k = np.sort(k)
    return k[np.concatenate([[True], k[1:] != k[:-1]])] if len(k) else k


def bitmap_of(keys: np.ndarray | None = None) -> Any:
    from pyroaring import BitMap64

    if keys is None or len(keys) == 0:
        return BitMap64()
    keys = np.sort(np.asarray(keys).astype(np.uint64, copy=False))  # sorted: ~2x faster
    return BitMap64(array.array("Q", keys.tobytes()))


def nbytes(fresh: list[tuple[bytes, Any]]) -> int:
    return sum(len(b) for b, _ in fresh)


def unite(fresh: list[tuple[bytes, Any]]) -> tuple[bytes, np.ndarray | None]:
    """Serialized pieces of keys as one (one deserialization and ``|=`` per piece)."""
    from pyroaring import BitMap64

    bm = BitMap64()
    for blob, _ in fresh:
        bm |= BitMap64.deserialize(blob)
    return bm.serialize(), since_of(fresh)


def count_in(bm: Any, a: int, b: int) -> int:
    """Keys of ``bm`` in ``[a, b)`` (``b`` may be 2^64)."""
    n = bm.range_cardinality(a, min(b, _TOP - 1))
    return n + 1 if b == _TOP and (_TOP - 1) in bm else n


def slice_of(bm: Any, a: int, b: int, n: int | None = None) -> Any:
    """The keys of ``bm`` in ``[a, b)`` (``n`` of them, if known) as a new bitmap: ``&``
    with a range bitmap over the containers they span (a full run container each), or,
    when they are sparse over a wide span (a range bitmap would be a container per 2^16
    keys of the span), a copy of ``bm`` with the rest removed."""
    from pyroaring import BitMap64

    n = count_in(bm, a, b) if n is None else n
    if n == 0:
        return BitMap64()
    if n == len(bm):
        return bm.copy()
    first = bm.next_set_bit(a) if a > 0 else bm.min()
    below = bm.rank(a - 1) if a > 0 else 0  # keys < a
    last = bm[below + n - 1]
    lo, hi = (first >> 16) << 16, ((last >> 16) + 1) << 16
    if (hi - lo) >> 16 <= 4 * n + 64:
        piece = bm & BitMap64(range(lo, min(hi, _TOP - 1)))
        if hi == _TOP and (_TOP - 1) in bm:
            piece.add(_TOP - 1)
        return piece
    piece = bm.copy()
    if a > 0:
        piece.remove_range(0, a)
    if b < _TOP:
        piece.remove_range(b, _TOP - 1)
        piece.discard(_TOP - 1)
    return piece


# Hand-written because pyroaring builds a bitmap from keys only while holding the GIL
# (~30-50 ns per scattered key): numpy makes the bytes of CRoaring's documented portable
# format (github.com/RoaringBitmap/RoaringFormatSpec; 64-bit: a bucket count, then per
# high 32 bits the 32-bit format), mostly off the GIL, and ``BitMap64.deserialize`` reads
# them in ~9 ns per key. Checked against pyroaring's own serialization in the tests.
_U16, _U32 = np.dtype("<u2"), np.dtype("<u4")
_NO_RUNS_COOKIE = 12346
_ARRAY_MAX = 4096  # keys per container above which it is a bitset


def portable(k: np.ndarray) -> bytes:
    """The portable roaring64 serialization of sorted, distinct uint64 keys ``k``."""
    hi32 = k >> np.uint64(32)
    cut = np.flatnonzero(hi32[1:] != hi32[:-1]) + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [len(k)]])
    out = [np.array([len(starts)], "<u8").tobytes()]
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        out.append(np.array([hi32[s]], _U32).tobytes())
        out.append(_portable32((k[s:e] & np.uint64(0xFFFFFFFF)).astype(np.uint32)))
    return b"".join(out)


def _portable32(v: np.ndarray) -> bytes:
    high = v >> np.uint32(16)
    low = (v & np.uint32(0xFFFF)).astype(_U16)
    cut = np.flatnonzero(high[1:] != high[:-1]) + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [len(v)]])
    cards = ends - starts
    bits = cards > _ARRAY_MAX
    sizes = np.where(bits, 8192, cards * 2)
    offsets = 8 + 8 * len(starts) + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    desc = np.empty((len(starts), 2), _U16)
    desc[:, 0], desc[:, 1] = high[starts], cards - 1
    parts = [np.array([_NO_RUNS_COOKIE, len(starts)], _U32).tobytes(), desc.tobytes(),
             offsets.astype(_U32).tobytes()]
    at = 0
    for i in np.flatnonzero(bits).tolist():  # arrays are the low halves as they are
        parts.append(low[at : starts[i]].tobytes())
        words = np.zeros(1024, np.uint64)
        x = low[starts[i] : ends[i]].astype(np.uint64)
        np.bitwise_or.at(words, x >> np.uint64(6), np.uint64(1) << (x & np.uint64(63)))
        parts.append(words.astype("<u8").tobytes())
        at = ends[i]
    parts.append(low[at:].tobytes())
    return b"".join(parts)

