"""Exact mid-epoch resume.

* :mod:`.state` — the loader state: what goes into a checkpoint, checking and loading
  one, planning the resumed epoch (``ResumeState``, ``ResumePlan``).
* :mod:`.consumed` — the consumed-ID set, kept compressed as it grows (a roaring
  bitmap folded on a background thread), and its encodings.
* :mod:`.filter` — the cluster-side filter dropping consumed rows (``ConsumedFilter``
  over a ``SharedConsumedSet``: key-range chunks put in the object store once).
* :mod:`.merge` — one state from every rank's (``merge_states``), inline or as per-rank
  part files (``part_state``).

The ID keys and the per-block lookup live in :mod:`torch_raydata.kernels.ids` (stage 3
and the remote path use them too) and are re-exported here. Does not own when state is
taken (``RayIterableDataset.state_dict``) nor how ranks exchange it
(``torch_raydata.distributed``, ``torch_raydata.lightning``).
"""

from ..kernels.ids import consumed_mask, drop_consumed, hash_strings, ids_as_uint64, split_consumed
from .consumed import ConsumedSet
from .filter import ConsumedFilter, SharedConsumedSet
from .merge import GATHER_MAX_BYTES, merge_states, part_state
from .state import STATE_VERSION, ResumePlan, ResumeState, fingerprint

__all__ = [
    "GATHER_MAX_BYTES",
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
    "part_state",
    "split_consumed",
]
