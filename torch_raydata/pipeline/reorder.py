"""Stage 5: reorder — only with ``preserve_order=True``; restores batch index order.

Owns a buffer of batches that finished collating ahead of an earlier one. Sits BEFORE
finalize, so it holds host batches, never device memory. Does not own the bound: the
caller passes ``on_emit`` (the collate pool's slot release), so batches waiting here
count against the same ``output_buffer_size`` as those in flight. That keeps memory
bounded when one batch is slow, and cannot deadlock: batches are pulled from the input
in index order, so the next expected one already holds a slot and will arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from .stats import StatsRecorder
from .types import Batch

__all__ = ["restore_order"]


def restore_order(
    batches: Iterable[Batch],
    *,
    start_idx: int = 0,
    on_emit: Callable[[], None] | None = None,
    stats: StatsRecorder | None = None,
) -> Iterator[Batch]:
    """Yield ``batches`` sorted by ``Batch.idx``, starting at ``start_idx``, as soon as
    each next index is available. Indices must be contiguous and unique."""
    held: dict[int, Batch] = {}
    want = start_idx
    for batch in batches:
        t0 = time.perf_counter()
        if batch.idx in held or batch.idx < want:
            raise RuntimeError(f"stage 5 (reorder): batch index {batch.idx} seen twice")
        held[batch.idx] = batch
        ready = []
        while want in held:
            ready.append(held.pop(want))
            want += 1
        if stats is not None:
            stats.add_time("reorder", time.perf_counter() - t0)
        for b in ready:
            if on_emit is not None:
                on_emit()
            yield b
    if held:
        raise RuntimeError(
            f"stage 5 (reorder): input ended while waiting for batch {want}; holding {sorted(held)}"
        )
