"""Exact mid-epoch resume.

* :mod:`.state` — the loader state: what goes into a checkpoint, checking and loading
  one, planning the resumed epoch (``ResumeState``, ``ResumePlan``).
* :mod:`.consumed` — the consumed-ID set and its compact (roaring bitmap) encoding.
* :mod:`.filter` — the cluster-side filter dropping consumed rows (``ConsumedFilter``
  over a ``SharedConsumedSet`` put in the object store once).
* :mod:`.merge` — one state from every rank's (``merge_states``).

The ID keys and the per-block lookup live in :mod:`torch_raydata.kernels.ids` (stage 3
and the remote path use them too) and are re-exported here. Does not own when state is
taken (``RayIterableDataset.state_dict``) nor how ranks exchange it
(``torch_raydata.distributed``, ``torch_raydata.lightning``).
"""

from ..kernels.ids import consumed_mask, drop_consumed, hash_strings, ids_as_uint64, split_consumed
from .consumed import ConsumedSet
from .filter import ConsumedFilter, SharedConsumedSet
from .merge import merge_states
from .state import STATE_VERSION, ResumePlan, ResumeState, fingerprint

__all__ = [
    "STATE_VERSION",
    "ConsumedFilter",
    "ConsumedSet",
    "ResumePlan",
    "ResumeState",
    "SharedConsumedSet",
    "consumed_mask",
    "drop_consumed",
    "fingerprint",
    "hash_strings",
    "ids_as_uint64",
    "merge_states",
    "split_consumed",
]
