"""Values that travel between stages: a block reference (stage 1 -> 2) and a Batch (3 -> 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.take import take_rows

__all__ = ["SourceBlock", "Batch"]


@dataclass(frozen=True)
class SourceBlock:
    """One block of the stream, as stage 1 hands it to the prefetcher.

    ``ref`` is whatever the fetcher resolves (a Ray ObjectRef in production, any key in
    tests). ``rows`` is an optional ``(start, stop)`` slice of the block that belongs to
    this stream; None means the whole block.
    """

    ref: Any
    size_bytes: int
    num_rows: int | None = None
    rows: tuple[int, int] | None = None


@dataclass
class Batch:
    """A batch and what travels with it.

    ``idx`` is its position in the epoch (reordering is buffering by index); ``ids`` the
    values of ``id_column`` for its rows (exact resume); ``data`` a ``pyarrow.Table`` until
    stage 4 collates it, then whatever the collate_fn returned. ``rows``: the batch is
    those rows of ``data`` (a shuffle's draw), gathered in stage 4 by the collate threads
    rather than in stage 3 under the input lock. ``spans``: ``data`` is, in order, rows
    ``[start, stop)`` of each ``(block, start, stop)`` (``kernels.take.BlockViews``), so a
    collate that knows blocks copies from views computed once per block, not per batch.
    """

    idx: int
    data: Any
    num_rows: int
    nbytes: int
    ids: np.ndarray | None = None
    rows: np.ndarray | None = None
    spans: tuple[tuple[Any, int, int], ...] | None = None

    def table(self) -> Any:
        """The batch's own rows as a table (gathers ``rows`` of ``data`` when set)."""
        if self.rows is None:
            return self.data
        return take_rows(self.data, self.rows)
