"""Kernels: Arrow views and gathers, and row-ID keys, shared by the stages, the collate
strategies, resume and the transports alike.

Owns nothing stateful: functions over tables, arrays and nested tensor containers.
Imports nothing else of the package, so every layer may import it.

* :mod:`.arrow` — Arrow type rules, zero-copy numpy views, the single copy into a tensor.
* :mod:`.take` — row gathers (``take_rows``) and per-block views (``BlockViews``).
* :mod:`.ids` — row-ID keys (``ids_as_uint64``) and dropping consumed rows by key.
* :mod:`.nested` — walks over nested tensor containers (dicts, lists, tuples).
"""

from . import arrow, ids, nested, take

__all__ = ["arrow", "ids", "nested", "take"]
