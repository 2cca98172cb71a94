"""Merging the loader states of several ranks into one (the consumed-ID sets united), so
a checkpoint resumes on any number of ranks, and the per-rank form of a state for sets
too large to gather.

Two forms of a merged state (``torch_raydata.distributed.gather_state_dict`` picks one):

* single: the union itself, inline (or spilled to one file); every rank sends its set to
  every other rank. For small sets (the ranks' sets together at most
  ``GATHER_MAX_BYTES``).
* parts: each rank writes its own set to a file in ``spill_dir`` (:func:`part_state`);
  the merged state lists the files, and the union is built when a run resumes from it
  (any world size: ``ConsumedSet.decode`` reads every part). Nothing but a few bytes per
  rank crosses the network at checkpoint time.

Does not own how ranks exchange their states (``torch_raydata.distributed``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

from .blobs import decode_one
from .consumed import ConsumedSet, write_blob

__all__ = ["GATHER_MAX_BYTES", "PARTS", "inline_bytes", "merge_states", "part_state"]

#: Above this many bytes of consumed-ID sets over all ranks, ``gather_state_dict`` saves
#: one part per rank instead of gathering the sets (the single form's inline limit too).
GATHER_MAX_BYTES = 64 << 20
PARTS = "roaring64-parts"


def part_state(state: dict, spill_dir: str, rank: int, world_size: int) -> dict:
    """``state`` with its consumed set in a file of its own under ``spill_dir`` (this
    rank's part); a set already spilled to a file is referenced where it is."""
    enc = state["consumed"]
    if enc.get("format") == PARTS:
        return state
    part: dict = {}
    if "path" in enc:
        path = enc["path"]
        if "sizes" in enc:
            part["sizes"] = enc["sizes"]
    else:
        name = (
            f"trd-consumed-e{state['epoch']}-rank{rank:05d}of{world_size:05d}-"
            f"{uuid.uuid4().hex[:12]}.roaring"
        )
        blobs = enc["bytes"]  # one blob, or several written back to back
        path = write_blob(os.path.abspath(spill_dir), blobs, name)
        if isinstance(blobs, (list, tuple)):
            part["sizes"] = [len(b) for b in blobs]
    if enc.get("minus") is not None:
        part["minus"] = enc["minus"]  # the last batches' keys, small: stays inline
    out = dict(state)
    part.update(path=path, count=int(enc["count"]), rank=rank)
    out["consumed"] = {"format": PARTS, "parts": [part], "count": part["count"]}
    return out


def merge_states(states: Sequence[dict], *, spill_dir: str | None = None) -> dict:
    """One loader state from every rank's ``RayIterableDataset.state_dict()`` (or their
    :func:`part_state`).

    The consumed-ID sets are united, so the merged state resumes on any number of ranks:
    the remaining rows are split afresh among them. All states must be of the same epoch
    and configuration (they are, when every rank saves at the same training step). Parts
    are listed, not read: their union is built (and checked for IDs consumed on two
    ranks) when a run loads the state.

    Raises:
        ValueError: the ranks are at different epochs or configurations, or an ID was
            consumed on two ranks (the ``id_column`` is not unique across the dataset).
    """
    if not states:
        raise ValueError("merge_states() needs at least one state")
    first = states[0]
    for key in ("version", "epoch", "exact", "fingerprint"):
        seen = [s.get(key) for s in states]
        if any(v != seen[0] for v in seen):
            raise ValueError(
                f"the ranks' loader states differ in {key}: {seen!r:.300}. Every rank must run "
                "every epoch and take its state at the same training step"
            )
    merged = dict(first)
    merged["world_size"] = len(states)
    # Equal steps: every rank has consumed as many batches (the min is the safe side of
    # the best-effort skip-ahead if they ever differ); rows add up.
    merged["batches_consumed"] = min(int(s["batches_consumed"]) for s in states)
    merged["rows_consumed"] = sum(int(s.get("rows_consumed", 0)) for s in states)
    if not first.get("exact"):
        return merged
    encs = [s["consumed"] for s in states]
    if all(e.get("format") == PARTS for e in encs):
        parts = [p for e in encs for p in e["parts"]]
        merged["consumed"] = {
            "format": PARTS, "parts": parts, "count": sum(int(p["count"]) for p in parts)
        }
        return merged
    union = ConsumedSet()
    total = 0
    for enc in encs:  # one rank's set in memory at a time besides the union
        count = enc.get("count") if isinstance(enc, dict) else None
        if (enc.get("format") == "roaring64" and enc.get("minus") is None
                and type(count) is int and count >= 0):
            decode_one(enc, None, into=union._bitmap)  # united straight in
            total += count
            continue
        one = ConsumedSet.decode(enc).bitmap()
        total += len(one)
        union._bitmap |= one
        del one
    if len(union) != total:
        raise ValueError(
            f"{total - len(union)} IDs were consumed on more than one rank: the "
            f"id_column {first['fingerprint'].get('id_column')!r} is not unique across "
            "the dataset, and a resume by ID would skip rows never trained on"
        )
    merged["consumed"] = union.encode(spill_dir=spill_dir)
    return merged


def inline_bytes(state: dict) -> int:
    """Bytes of the consumed set ``state`` would send to the other ranks if gathered."""
    enc = state.get("consumed") if state.get("exact") else None
    if not isinstance(enc, dict) or enc.get("format") == PARTS:
        return 0
    if "bytes" in enc:
        blobs = enc["bytes"]
        return sum(map(len, blobs)) if isinstance(blobs, (list, tuple)) else len(blobs)
    return os.path.getsize(enc["path"]) if "path" in enc else 0
