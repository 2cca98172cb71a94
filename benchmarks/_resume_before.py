"""The consumed-ID set and filter as they were before issue 17 (commit e059a5e), kept so
``benchmarks.resume_scale`` measures "before" with the same harness as "after".

Only what the benchmark calls: keys appended per batch, the bitmap built at
``encode()`` (on the training step's thread), ranks merged by decoding every set and
uniting them pairwise, the filter deserializing the whole set per worker process and
looking a block's IDs up through a Python list.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BeforeSet", "before_mask", "before_merge"]


class BeforeSet:
    def __init__(self, bitmap=None) -> None:  # noqa: ANN001
        from pyroaring import BitMap64

        self._bitmap = bitmap if bitmap is not None else BitMap64()
        self._pending: list[np.ndarray] = []

    def add(self, keys: np.ndarray) -> None:
        self._pending.append(keys)

    def bitmap(self):  # noqa: ANN201
        if self._pending:
            keys = np.concatenate(self._pending)
            self._pending.clear()
            self._bitmap.update(keys.tolist())
        return self._bitmap

    def union(self, other: BeforeSet) -> BeforeSet:
        return BeforeSet(self.bitmap() | other.bitmap())

    def encode(self) -> dict:
        bm = self.bitmap()
        bm.run_optimize()
        return {"format": "roaring64", "bytes": bm.serialize(), "count": len(bm)}

    @classmethod
    def decode(cls, enc: dict) -> BeforeSet:
        from pyroaring import BitMap64

        return cls(BitMap64.deserialize(enc["bytes"]))


def before_merge(encs: list[dict]) -> dict:
    sets = [BeforeSet.decode(e) for e in encs]
    union = BeforeSet()
    for one in sets:
        union = union.union(one)
    return union.encode()


def before_mask(bitmap, ids: np.ndarray) -> np.ndarray:  # noqa: ANN001
    from pyroaring import BitMap64

    none = np.zeros(len(ids), dtype=bool)
    lo, hi = int(ids.min()), int(ids.max())
    if bitmap.range_cardinality(lo, hi + 1) == 0:
        return none
    keys = np.frombuffer((bitmap & BitMap64(ids.tolist())).to_array(), dtype=np.uint64)
    if len(keys) == 0:
        return none
    pos = np.searchsorted(keys, ids)
    pos[pos == len(keys)] = 0
    return keys[pos] == ids
