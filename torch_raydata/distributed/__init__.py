"""Distributed training: one Ray cluster per run, one shard per rank, equal steps per rank.

* :mod:`.cluster` — starting/attaching Ray on every rank (``init_ray``), ``world()``, the
  collectives and ``gather_state_dict``.
* :mod:`.sharding` — the hand-out actor splitting a Dataset across the ranks (``shard``)
  and ``RankSource``, stage 1 as one rank sees it.
"""

from .cluster import STRAGGLER_SECONDS, gather_state_dict, init_ray, world
from .sharding import NAMESPACE, RankShard, RankSource, shard

__all__ = [
    "NAMESPACE",
    "STRAGGLER_SECONDS",
    "RankShard",
    "RankSource",
    "gather_state_dict",
    "init_ray",
    "shard",
    "world",
]
