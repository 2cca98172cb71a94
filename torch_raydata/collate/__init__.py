"""Collate strategies: turn one Arrow table (a Ray Data batch) into torch tensors.

One module per strategy (``default.py``, ``pad.py``); pass an instance as
``RayIterableDataset(collate_fn=...)``. The Arrow type rules, views and gathers they
share live in :mod:`torch_raydata.kernels`.
"""

from __future__ import annotations

from torch_raydata.collate.default import DefaultCollate
from torch_raydata.collate.pad import PadCollate

__all__ = ["DefaultCollate", "PadCollate"]
