"""The consumed-ID set: the IDs of rows *yielded to the training step* in one epoch
(never the prefetched or collated-and-waiting ones), kept compressed as it grows, and its
checkpoint forms.

Owns recording keys (an O(1) append on the training step's thread; a background thread,
``trd-consumed``, folds them into the compressed set), snapshots for a checkpoint, set
algebra, the encodings and splitting the set into key-range chunks (for the cluster-side
filter). Does not own the ID keys (``torch_raydata.kernels.ids``), the cluster-side
filter (``filter.py``), merging ranks' states (``merge.py``) or when state is taken
(``state.py``).

Compact form: a 64-bit roaring bitmap (``pyroaring.BitMap64``), a well-kept library
(CRoaring); the alternative weighed, numpy sorted disjoint runs (two uint64 arrays), needs
400 MB for 100M IDs drawn at random from 200M (two IDs per run on average) where the
bitmap needs 25 MB; contiguous IDs are a few KB either way. Measured here
(benchmarks/RESULTS_resume.md): folding costs 27-160 ns per ID on the set's thread,
``state_dict()`` at 100M random IDs 36-68 ms depending on load (was 22 s; one
serialization of 24 MiB), the union of 8 ranks' parts ~0.8 ms per MiB. pyroaring holds the GIL, so the thread folds at most ``_FOLD_KEYS`` keys per call:
the training step never waits more than one such call (~2 ms) for it.

Encodings (``encode``/``decode``), the state's ``"consumed"`` entry:

* ``{"format": "roaring64", "bytes": <portable BitMap64>, "count": n}`` — inline; the
  form every state had before the set was kept compressed (still written and read).
* ``{"format": "roaring64", "path": <file>, "count": n}`` — the same bytes spilled to a
  file under ``spill_dir`` when larger than ``max_inline_bytes``.
* ``{"format": "roaring64-parts", "parts": [{"path", "count", "rank"}...], "count": n}``
  — one file per rank (``torch_raydata.distributed.gather_state_dict`` above its gather
  limit); the set is the union of the parts.
"""

from __future__ import annotations

import array
import collections
import os
import threading
import uuid
from typing import Any

import numpy as np

__all__ = ["ConsumedSet", "check_parts", "read_blob", "write_blob"]

#: Keys folded into the bitmap per pyroaring call (it holds the GIL for the whole call:
#: 64K keys are ~2 ms on this machine).
_FOLD_KEYS = 1 << 16
#: Keys folded into the small bitmap before it is merged into the main one.
_DELTA_KEYS = 1 << 20
#: Batches whose keys a recording set keeps as they came, so a state can leave the last
#: ``lag`` of them out (``EpochProgress.rows_consumed`` keeps as many row counts).
RECENT_BATCHES = 16


class _Batch:
    """One batch's keys: the array as added, then (once folded) the batch's bitmap."""

    __slots__ = ("keys",)

    def __init__(self, keys: np.ndarray) -> None:
        self.keys: Any = keys


def _bitmap(keys: np.ndarray | None = None) -> Any:
    from pyroaring import BitMap64

    if keys is None or len(keys) == 0:
        return BitMap64()
    keys = np.sort(np.asarray(keys).astype(np.uint64, copy=False))  # sorted: ~2x faster
    return BitMap64(array.array("Q", keys.tobytes()))


class ConsumedSet:
    """A set of row IDs (uint64 keys), kept compressed.

    ``add()`` only queues the keys; a recording set (``ConsumedSet.recording()``) folds
    them into the bitmap on a background thread, started at the first ``add()`` and
    joined by ``close()``; any other set folds them when it is next read. ``snapshot()``
    is what a checkpoint takes on the training step's thread: the keys still queued
    (normally none or one batch) are folded there, then the bitmap is serialized.
    """

    def __init__(self, bitmap: Any = None, *, background: bool = False) -> None:
        self._bitmap = bitmap if bitmap is not None else _bitmap()
        self._bm_lock = threading.Lock()  # the bitmap and its fold
        self._cv = threading.Condition()  # the queue, the thread's state
        self._queue: collections.deque[Any] = collections.deque()
        # The last batches' keys (for ``snapshot(lag)``): raw until folded, then as the
        # batch's own bitmap (contiguous keys: bytes; scattered: ~2 bytes per key).
        self._recent: collections.deque[_Batch] = collections.deque(maxlen=RECENT_BATCHES)
        self._background = background
        self._thread: threading.Thread | None = None
        self._closed = False
        self._error: BaseException | None = None
        self.added = 0  # keys passed to add(), repeats included
        self._expected = len(self._bitmap)  # keys it would hold if none repeated
        self._unoptimized = 0  # keys folded since the last run_optimize
        # Batches are folded into a small bitmap first, merged into the main one every
        # _DELTA_KEYS keys: a batch whose keys are spread over every container (one rank
        # of many, after a global shuffle) then costs what the small bitmap is, not a pass
        # over the main one (measured on one rank of 8 at 100M: ~1100 -> ~400 ns per key);
        # a state_dict() merges at most that many keys on the step's thread.
        self._delta = _bitmap()

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
                    while not self._queue and not self._closed:
                        self._cv.wait()
                    if self._closed:
                        return
                with self._bm_lock:  # popped under the bitmap's lock: a snapshot sees it
                    with self._cv:
                        item = self._queue.popleft() if self._queue else None
                    if item is not None:
                        self._fold(item)
                        self._optimize_now_and_then()
                item = None  # not kept alive while waiting for the next batch
        except BaseException as e:  # noqa: BLE001 - re-raised on the training step
            self._error = e

    def _fold(self, item: Any) -> None:
        """Fold one queued item into the bitmap (caller holds ``_bm_lock``)."""
        self._unoptimized += len(item.keys) if isinstance(item, _Batch) else len(item)
        if not isinstance(item, _Batch):  # a BitMap64 (include)
            self._bitmap |= item
            return
        keys, own = item.keys, None
        if not isinstance(keys, np.ndarray):  # folded already
            return
        for i in range(0, len(keys), _FOLD_KEYS):
            piece = _bitmap(keys[i : i + _FOLD_KEYS])
            self._delta |= piece
            own = piece if own is None else own | piece
        item.keys = own if own is not None else _bitmap()  # the raw array goes
        if len(self._delta) >= _DELTA_KEYS:
            self._merge_delta()

    def _merge_delta(self) -> None:
        """The small bitmap into the main one (caller holds ``_bm_lock``)."""
        if len(self._delta):
            self._bitmap |= self._delta
            self._delta = _bitmap()

    def _optimize_now_and_then(self) -> None:
        """Runs of keys as run containers (contiguous IDs: a few bytes per 2^16 instead of
        8 KiB), once a quarter of the set was folded since the last time (caller holds
        ``_bm_lock``; ~20 ms per 100M keys, so not on the training step's thread)."""
        if self._unoptimized >= max(1 << 22, len(self._bitmap) // 4):
            self._bitmap.run_optimize()
            self._unoptimized = 0

    def _fold_queued(self) -> None:
        """Fold everything queued, on the caller's thread (caller holds ``_bm_lock``)."""
        with self._cv:
            items = list(self._queue)
            self._queue.clear()
        for item in items:
            self._fold(item)
        self._merge_delta()

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
        by the set: do not modify it while the set records."""
        self._raise_error()
        with self._bm_lock:
            self._fold_queued()
            return self._bitmap

    def __len__(self) -> int:
        return len(self.bitmap())

    @property
    def repeats(self) -> int:
        """Keys added (or included) more than once: a non-unique ``id_column``."""
        return self._expected - len(self)

    def union(self, other: ConsumedSet) -> ConsumedSet:
        return ConsumedSet(self.bitmap() | other.bitmap())

    def sorted_keys(self) -> np.ndarray:
        """The set's uint64 keys in ascending order (e.g. to read which rows a checkpoint
        has consumed: integer IDs are the keys viewed as uint64)."""
        return np.frombuffer(self.bitmap().to_array(), dtype=np.uint64)

    def snapshot(self, lag: int = 0) -> tuple[bytes, int]:
        """``(portable serialization, count)`` of the set without the keys of the last
        ``lag`` batches added (taken, not yet trained on). Cost: folding what is still
        queued plus one serialization (~15 ms for 25 MB here); the bitmap is not copied.
        """
        self._raise_error()
        if lag > len(self._recent):
            raise ValueError(f"{lag=} is more than the {len(self._recent)} batches kept")
        with self._bm_lock:
            self._fold_queued()
            held = None
            for batch in list(self._recent)[len(self._recent) - lag :] if lag else ():
                held = batch.keys if held is None else held | batch.keys
            if held is not None:  # out for the serialization, back in after it
                self._bitmap -= held
            try:
                return self._bitmap.serialize(), len(self._bitmap)
            finally:
                if held is not None:
                    self._bitmap |= held

    def serialized(self) -> np.ndarray:
        """The roaring bitmap's portable serialization, as a uint8 array (for ray.put)."""
        return np.frombuffer(self.snapshot()[0], dtype=np.uint8)

    def chunks(self, target_bytes: int) -> list[tuple[int, int, bytes]]:
        """The set split by key range: ``(start, stop, portable bytes)`` per non-empty
        range, each at most ``target_bytes`` unless one 2^16-key container alone is
        larger (8 KiB at most). Ranges are disjoint, ascending and 2^16-aligned."""
        from pyroaring import BitMap64

        bm = self.bitmap()
        if len(bm) == 0:
            return []
        bm.run_optimize()
        lo, hi = (bm.min() >> 16) << 16, ((bm.max() >> 16) + 1) << 16
        pieces = max(1, -(-len(bm.serialize()) // max(1, target_bytes)))
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

    # -- encoding --------------------------------------------------------------------------
    def encode(
        self, *, spill_dir: str | None = None, max_inline_bytes: int = 64 << 20, lag: int = 0
    ) -> dict:
        """The state's ``"consumed"`` entry (see the module docstring)."""
        blob, count = self.snapshot(lag)
        if len(blob) > max_inline_bytes:
            if spill_dir is None:
                raise ValueError(
                    f"the consumed-ID set is {len(blob):,} bytes (> {max_inline_bytes=}); set "
                    "RayIterableDataset.spill_dir to a checkpoint directory to spill it to a file"
                )
            return {"format": "roaring64", "path": write_blob(spill_dir, blob), "count": count}
        return {"format": "roaring64", "bytes": blob, "count": count}

    @classmethod
    def decode(cls, enc: Any, *, search_dir: str | None = None) -> ConsumedSet:
        """The set of an encoding; a spilled file or part whose recorded path is gone is
        looked for by name in ``search_dir`` (e.g. a checkpoint directory moved since)."""
        from pyroaring import BitMap64

        fmt = enc.get("format") if isinstance(enc, dict) else None
        if fmt == "roaring64-parts":
            return cls._decode_parts(enc, search_dir)
        if fmt != "roaring64":
            raise ValueError(
                f"consumed-ID set must be a roaring64 or roaring64-parts encoding, got {enc!r:.120}"
            )
        if "bytes" in enc:
            blob = enc["bytes"]
        elif "path" in enc:
            blob = read_blob(enc["path"], search_dir)
        else:
            raise ValueError(f"consumed-ID set has neither bytes nor path: {enc!r:.120}")
        try:
            bm = BitMap64.deserialize(blob)
        except Exception as e:  # pyroaring raises IndexError/ValueError on garbage
            raise ValueError(
                f"consumed-ID set is corrupt: {len(blob)} bytes that are not a roaring64 "
                f"bitmap ({type(e).__name__}: {e}); restore the checkpoint's loader state"
            ) from e
        if "count" in enc and len(bm) != enc["count"]:
            raise ValueError(f"consumed-ID set is corrupt: {len(bm)} IDs, expected {enc['count']}")
        return cls(bm)

    @classmethod
    def _decode_parts(cls, enc: dict, search_dir: str | None) -> ConsumedSet:
        """The union of the ranks' parts, one part in memory at a time besides the union
        (peak: the union plus the largest part)."""
        parts = enc.get("parts")
        if not isinstance(parts, list) or not parts:
            raise ValueError(f"consumed-ID set has no parts: {enc!r:.200}")
        union = cls()
        total = 0
        for part in parts:
            one = cls.decode({"format": "roaring64", **part}, search_dir=search_dir)
            total += len(one)
            union._bitmap |= one._bitmap
            del one
        n = len(union._bitmap)
        if n != total:
            raise ValueError(
                f"{total - n} IDs were consumed on more than one rank: the id_column is not "
                "unique across the dataset, and a resume by ID would skip rows never trained on"
            )
        if "count" in enc and n != enc["count"]:
            raise ValueError(f"consumed-ID set is corrupt: {n} IDs, expected {enc['count']}")
        union._expected = n
        return union


def check_parts(enc: dict, search_dir: str | None = None) -> int:
    """The ID count of a parts encoding whose every part file can be found (at its path or
    by name in ``search_dir``); a clear error otherwise. Reads no part."""
    parts = enc.get("parts")
    if not isinstance(parts, list) or not parts:
        raise ValueError(f"consumed-ID set has no parts: {enc!r:.200}")
    for part in parts:
        path = part.get("path") if isinstance(part, dict) else None
        if not isinstance(path, str):
            raise ValueError(f"consumed-ID set has a part without a path: {part!r:.120}")
        found = os.path.exists(path) or (
            search_dir is not None and os.path.exists(os.path.join(search_dir, os.path.basename(path)))
        )
        if not found:
            read_blob(path, search_dir)  # raises the one error for a missing file
    count = enc.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"consumed-ID set has count={count!r}, not an int >= 0: it is corrupt")
    return count


def write_blob(directory: str, blob: bytes, name: str | None = None) -> str:
    """Write ``blob`` to a new file in ``directory`` (whole or not at all: written to a
    temporary name, then renamed); return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name or f"trd-consumed-{uuid.uuid4().hex}.roaring")
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return path


def read_blob(path: str, search_dir: str | None = None) -> bytes:
    """A spilled set's bytes: at ``path``, else under its file name in ``search_dir``."""
    candidates = [path]
    if search_dir is not None:
        candidates.append(os.path.join(search_dir, os.path.basename(path)))
    for p in candidates:
        try:
            with open(p, "rb") as f:
                return f.read()
        except OSError as e:
            err = e
    where = f" nor in {search_dir!r}" if search_dir is not None else ""
    raise ValueError(
        f"the consumed-ID set was spilled to {path!r}, which cannot be read{where} "
        f"({err}); restore the checkpoint directory with it, or set the loader's spill_dir "
        "to the directory that now holds it"
    )
