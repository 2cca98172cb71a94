"""The consumed-ID set: the IDs of rows *yielded to the training step* in one epoch
(never the prefetched or collated-and-waiting ones), and its compact checkpoint form.

Owns recording keys (O(1) appends on the consumer thread), set algebra and the
encoding. Does not own the ID keys (``torch_raydata.kernels.ids``), the cluster-side
filter (``filter.py``), merging ranks' states (``merge.py``) or when state is taken
(``state.py``).

Compact form: a 64-bit roaring bitmap (``pyroaring.BitMap64``), measured on this machine
against a delta-encoded, zlib-compressed sorted array: 10M IDs drawn at random from 20M
-> 2.5 MB roaring vs 7.6 MB zlib-delta; serialize 3 ms, deserialize 1.5 ms, set union
built in. Contiguous ranges compress to almost nothing. Sets larger than
``max_inline_bytes`` are written to a file under ``spill_dir`` and the state keeps the
path.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np

__all__ = ["ConsumedSet"]


class ConsumedSet:
    """A set of row IDs (as uint64 keys). Appends are O(1) on the consumer thread; the
    bitmap is built lazily when the state is taken."""

    def __init__(self, bitmap: Any = None) -> None:
        from pyroaring import BitMap64

        self._bitmap = bitmap if bitmap is not None else BitMap64()
        self._pending: list[np.ndarray] = []
        self.added = 0  # keys passed to add(), repeats included (len(self) < added: repeats)

    def add(self, keys: np.ndarray) -> None:
        self._pending.append(keys)
        self.added += len(keys)

    def _flush(self) -> None:
        if self._pending:
            keys = np.concatenate(self._pending)
            self._pending.clear()
            self._bitmap.update(keys.tolist())

    def bitmap(self) -> Any:
        self._flush()
        return self._bitmap

    def __len__(self) -> int:
        return len(self.bitmap())

    def union(self, other: ConsumedSet) -> ConsumedSet:
        return ConsumedSet(self.bitmap() | other.bitmap())

    def sorted_keys(self) -> np.ndarray:
        """The set's uint64 keys in ascending order (e.g. to read which rows a checkpoint
        has consumed: integer IDs are the keys viewed as uint64)."""
        return np.frombuffer(self.bitmap().to_array(), dtype=np.uint64)

    def serialized(self) -> np.ndarray:
        """The roaring bitmap's portable serialization, as a uint8 array (for ray.put)."""
        bm = self.bitmap()
        bm.run_optimize()
        return np.frombuffer(bm.serialize(), dtype=np.uint8)

    # -- encoding --------------------------------------------------------------------------
    def encode(self, *, spill_dir: str | None = None, max_inline_bytes: int = 64 << 20) -> dict:
        bm = self.bitmap()
        bm.run_optimize()
        blob = bm.serialize()
        if len(blob) > max_inline_bytes:
            if spill_dir is None:
                raise ValueError(
                    f"the consumed-ID set is {len(blob):,} bytes (> {max_inline_bytes=}); set "
                    "RayIterableDataset.spill_dir to a checkpoint directory to spill it to a file"
                )
            os.makedirs(spill_dir, exist_ok=True)
            path = os.path.join(spill_dir, f"trd-consumed-{uuid.uuid4().hex}.roaring")
            with open(path, "wb") as f:
                f.write(blob)
            return {"format": "roaring64", "path": path, "count": len(bm)}
        return {"format": "roaring64", "bytes": blob, "count": len(bm)}

    @classmethod
    def decode(cls, enc: Any) -> ConsumedSet:
        from pyroaring import BitMap64

        if not isinstance(enc, dict) or enc.get("format") != "roaring64":
            raise ValueError(f"consumed-ID set must be a roaring64 encoding, got {enc!r:.120}")
        if "bytes" in enc:
            blob = enc["bytes"]
        elif "path" in enc:
            try:
                with open(enc["path"], "rb") as f:
                    blob = f.read()
            except OSError as e:
                raise ValueError(
                    f"the consumed-ID set was spilled to {enc['path']!r}, which cannot be read "
                    f"({e}); restore the checkpoint directory with it"
                ) from e
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
