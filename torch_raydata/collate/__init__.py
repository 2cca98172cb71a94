"""Collate strategies: turn one Arrow table (a Ray Data batch) into torch tensors.

One module per strategy; `COLLATES` maps the strategy names accepted by the
higher-level API to their classes.
"""

from __future__ import annotations

from torch_raydata.collate.default import DefaultCollate
from torch_raydata.collate.pad import PadCollate

__all__ = ["COLLATES", "DefaultCollate", "PadCollate"]

COLLATES: dict[str, type] = {"default": DefaultCollate, "pad": PadCollate}
