"""The consumed-ID set's checkpoint forms: a state's ``"consumed"`` entry from serialized
bitmaps, and a bitmap back from one.

Encodings (``ConsumedSet.encode``/``decode``):

* ``{"format": "roaring64", "bytes": <portable BitMap64>, "count": n}`` — inline; the
  form every state had before the set kept a serialized copy of itself (still written for
  small sets, and read).
* ``{"format": "roaring64", "bytes": [<blob>, ...], "count": n[, "minus": <blob>]}`` — the
  set is the union of the blobs (key-range pieces serialized ahead of time by the set's
  thread, plus the keys added since), less ``minus`` (the last batches, taken but not yet
  trained on, when a state leaves them out).
* ``{"format": "roaring64", "path": <file>, "count": n[, "sizes": [...], "minus": ...]}``
  — the same bytes spilled to a file under ``spill_dir`` when larger than
  ``max_inline_bytes``; with ``sizes``, the file holds that many blobs back to back.
* ``{"format": "roaring64-parts", "parts": [{"path", "count", "rank"[, "sizes",
  "minus"]}...], "count": n}`` — one file per rank (``torch_raydata.distributed.
  gather_state_dict`` above its gather limit); the set is the union of the parts.

Does not own the set (``consumed.py``) nor merging ranks (``merge.py``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any

__all__ = ["check_parts", "decode_one", "decode_parts", "encode_blobs", "read_blob", "write_blob"]

_FIX = "restore the checkpoint's loader state"


def encode_blobs(
    blobs: Sequence[bytes], minus: bytes | None, count: int, *, spill_dir: str | None,
    max_inline_bytes: int,
) -> dict:
    """The ``"consumed"`` entry of a set that is the union of ``blobs`` less ``minus``."""
    enc: dict[str, Any] = {"format": "roaring64"}
    nbytes = sum(len(b) for b in blobs)
    if nbytes > max_inline_bytes:
        if spill_dir is None:
            raise ValueError(
                f"the consumed-ID set is {nbytes:,} bytes (> {max_inline_bytes=}); set "
                "RayIterableDataset.spill_dir to a checkpoint directory to spill it to a file"
            )
        enc["path"] = write_blob(spill_dir, blobs)
        if len(blobs) != 1:
            enc["sizes"] = [len(b) for b in blobs]
    else:
        enc["bytes"] = blobs[0] if len(blobs) == 1 and minus is None else list(blobs)
    if minus is not None:
        enc["minus"] = minus
    enc["count"] = count
    return enc


def decode_one(enc: dict, search_dir: str | None, into: Any = None) -> Any:
    """The ``pyroaring.BitMap64`` of a ``roaring64`` encoding (inline or spilled); with
    ``into`` (a bitmap), the encoding's keys are united into it instead (one without
    ``minus`` only; the caller checks the count) and it is returned."""
    from pyroaring import BitMap64

    if "bytes" in enc:
        blobs = enc["bytes"]
        blobs = list(blobs) if isinstance(blobs, (list, tuple)) else [blobs]
    elif "path" in enc:
        blobs = _split(read_blob(enc["path"], search_dir), enc.get("sizes"), enc["path"])
    else:
        raise ValueError(f"consumed-ID set has neither bytes nor path: {enc!r:.120}")
    # A state is ~1 MiB key-range pieces (disjoint) plus small blobs of the keys added
    # since, which are scattered over every container of the set: the small ones are
    # united with each other first (smallest first) and merged into the rest once, not
    # once per blob (pieces first made the union at resume of 8 ranks' parts at 100M IDs
    # 3.4x slower). One piece besides the union in memory at a time.
    blobs = sorted(blobs, key=_len)
    top = max(_len(blobs[-1]), 0) // 4 if blobs else 0
    small = [b for b in blobs if _len(b) < top]
    large = blobs[len(small):]
    if into is not None:
        bm = into
    elif large:  # the largest piece is the union to be (no copy of it)
        bm = _deserialize(large.pop(), "bytes")
    else:
        bm = BitMap64()
    acc = BitMap64() if small and len(bm) else bm
    for blob in small:
        acc |= _deserialize(blob, "bytes")
    for blob in large:
        bm |= _deserialize(blob, "bytes")
    if acc is not bm:
        bm |= acc
    if into is not None:
        return bm
    if enc.get("minus") is not None:
        bm -= _deserialize(enc["minus"], "minus")
    if "count" in enc and len(bm) != enc["count"]:
        fewer = type(enc["count"]) is int and len(bm) < enc["count"]
        why = (  # a recording set finds a repeat across its pieces late: consumed.py
            "the run's id_column repeated IDs it had not found yet when the state was "
            "taken (it is not unique), or the state is corrupt" if fewer else "it is corrupt"
        )
        raise ValueError(
            f"consumed-ID set has {len(bm)} IDs, expected count={enc['count']!r}: {why}; {_FIX}"
        )
    return bm


def decode_parts(enc: dict, search_dir: str | None) -> Any:
    """The union of a parts encoding's parts (a ``pyroaring.BitMap64``), one part in
    memory at a time besides the union (peak: the union plus the largest part)."""
    from pyroaring import BitMap64

    parts = enc.get("parts")
    if not isinstance(parts, list) or not parts:
        raise ValueError(f"consumed-ID set has no parts: {enc!r:.200}")
    union = BitMap64()
    total = 0
    for part in parts:
        if not isinstance(part, dict):
            raise ValueError(f"consumed-ID set has a part that is not a dict: {part!r:.120}")
        enc1 = {"format": "roaring64", **part}
        count = part.get("count")
        if part.get("minus") is None and type(count) is int and count >= 0:
            # United straight in (no copy of the part); a part holding fewer keys than
            # its count shows as the check below.
            decode_one(enc1, search_dir, into=union)
            total += count
            continue
        one = decode_one(enc1, search_dir)
        total += len(one)
        union |= one
        del one
    n = len(union)
    if n != total:
        raise ValueError(
            f"{total - n} IDs were consumed on more than one rank: the id_column is not "
            "unique across the dataset, and a resume by ID would skip rows never trained on"
        )
    if "count" in enc and n != enc["count"]:
        raise ValueError(f"consumed-ID set is corrupt: {n} IDs, expected {enc['count']}")
    return union


def _len(blob: Any) -> int:
    return len(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else -1


def _deserialize(blob: Any, key: str) -> Any:
    from pyroaring import BitMap64

    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError(
            f"consumed-ID set is corrupt: {key!r} holds a {type(blob).__name__} "
            f"({blob!r:.60}), not the bytes of a roaring64 bitmap; {_FIX}"
        )
    try:
        return BitMap64.deserialize(blob)
    except Exception as e:  # pyroaring raises IndexError/ValueError on garbage
        raise ValueError(
            f"consumed-ID set is corrupt: {len(blob)} bytes in {key!r} that are not a "
            f"roaring64 bitmap ({type(e).__name__}: {e}); {_FIX}"
        ) from e


def _split(data: bytes, sizes: Any, path: str) -> list[memoryview]:
    """A spilled file's blobs (``sizes``: their lengths; None: the file is one blob)."""
    if sizes is None:
        return [memoryview(data)]
    ok = isinstance(sizes, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes
    )
    if not ok or sum(sizes) != len(data):
        raise ValueError(
            f"consumed-ID set is corrupt: sizes={sizes!r:.120} do not split the "
            f"{len(data):,} bytes of {path!r}; {_FIX} together with that file"
        )
    view, out, at = memoryview(data), [], 0
    for n in sizes:
        out.append(view[at : at + n])
        at += n
    return out


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


def write_blob(directory: str, blob: bytes | Sequence[bytes], name: str | None = None) -> str:
    """Write ``blob`` (or several, back to back) to a new file in ``directory`` (whole or
    not at all: written to a temporary name, then renamed); return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name or f"trd-consumed-{uuid.uuid4().hex}.roaring")
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        for b in [blob] if isinstance(blob, (bytes, bytearray, memoryview)) else blob:
            f.write(b)  # no concatenated copy of the pieces
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
