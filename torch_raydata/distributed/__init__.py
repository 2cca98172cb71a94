"""Distributed training: one Ray cluster per run, one shard per rank, equal steps per rank.

* :mod:`.cluster` — starting/attaching Ray on every rank (``init_ray``; a process
  that started Ray keeps it up at exit until the other ranks left), ``world()``, the
  collectives and ``gather_state_dict``.
* :mod:`.sharding` — the hand-out actor splitting a Dataset across the ranks (``shard``)
  and ``RankSource``, stage 1 as one rank sees it.
"""

from .cluster import (
    EXIT_WAIT_SECONDS,
    STRAGGLER_SECONDS,
    gather_state_dict,
    init_ray,
    wait_for_other_drivers,
    world,
)
from .sharding import NAMESPACE, RankShard, RankSource, shard

__all__ = [
    "EXIT_WAIT_SECONDS",
    "NAMESPACE",
    "STRAGGLER_SECONDS",
    "RankShard",
    "RankSource",
    "gather_state_dict",
    "init_ray",
    "shard",
    "wait_for_other_drivers",
    "world",
]
