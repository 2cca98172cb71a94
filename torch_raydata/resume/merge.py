"""Merging the loader states of several ranks into one (the consumed-ID sets united), so
a checkpoint resumes on any number of ranks. Does not own how ranks exchange their
states (``torch_raydata.distributed.gather_state_dict``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .consumed import ConsumedSet

__all__ = ["merge_states"]


def merge_states(states: Sequence[dict], *, spill_dir: str | None = None) -> dict:
    """One loader state from every rank's ``RayIterableDataset.state_dict()``.

    The consumed-ID sets are united, so the merged state resumes on any number of ranks:
    the remaining rows are split afresh among them. All states must be of the same epoch
    and configuration (they are, when every rank saves at the same training step).

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
    if first.get("exact"):
        sets = [ConsumedSet.decode(s["consumed"]) for s in states]
        union = ConsumedSet()
        for one in sets:
            union = union.union(one)
        total = sum(len(one) for one in sets)
        if len(union) != total:
            raise ValueError(
                f"{total - len(union)} IDs were consumed on more than one rank: the "
                f"id_column {first['fingerprint'].get('id_column')!r} is not unique across "
                "the dataset, and a resume by ID would skip rows never trained on"
            )
        merged["consumed"] = union.encode(spill_dir=spill_dir)
    return merged
