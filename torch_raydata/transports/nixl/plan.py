"""Stage 3 of the remote epoch, on metadata: batches as row coordinates in blocks.

Owns: cutting the epoch's block stream into :class:`BatchPlan` s from the blocks' row
counts alone (no block is fetched), the same batches as the local stage 3
(``pipeline/batching.py``) for the same block order, including its seeded shuffle draw;
and, when resuming, the offsets of the rows to keep (``kept_rows``, run next to a block).
Does not own running the plans (the collate actors, ``worker.py``) or the epoch's threads
(``epoch.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ...kernels.ids import check_column, column_ids, consumed_mask, ids_as_uint64
from ...kernels.take import take_rows
from ...pipeline.batching import ShuffleDraw, to_arrow
from ...pipeline.stats import StatsRecorder
from ...pipeline.types import SourceBlock

__all__ = ["BatchPlan", "kept_rows", "plan_batches"]


@dataclass(frozen=True)
class BatchPlan:
    """One batch as row coordinates: ``concat(refs[i][start:stop] for i, start, stop in
    pieces)``, then ``take`` (row positions in that concatenation, in batch order) when
    shuffled. ``nbytes`` is estimated from block metadata (stats)."""

    idx: int
    refs: tuple[Any, ...]
    pieces: tuple[tuple[int, int, int], ...]
    num_rows: int
    nbytes: int
    take: np.ndarray | None = None

    def materialize(
        self, id_column: str | None = None, get: Callable[[list[Any]], list[Any]] | None = None
    ) -> tuple[pa.Table, np.ndarray | None]:
        """The batch's table (and its ``id_column`` values). Runs in the collate actor;
        ``get`` resolves the refs (default ``ray.get``; tests pass a dict lookup)."""
        if get is None:
            import ray

            get = ray.get
        tables = [to_arrow(b) for b in get(list(self.refs))]
        parts = [tables[i].slice(start, stop - start) for i, start, stop in self.pieces]
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)  # zero-copy
        if self.take is not None:
            table = take_rows(table, self.take)  # the shuffle's gather (one copy)
        ids = None
        if id_column is not None:
            ids = column_ids(table, id_column)
        return table, ids


@dataclass
class _Block:
    ref: Any
    base: int  # first row of this stream's slice of the block
    rows: int  # rows planned from it (kept rows when resuming)
    row_bytes: float
    live: int  # rows not yet planned (shuffle); the ref is dropped at 0
    keep: np.ndarray | None = None  # resuming: offsets (in the slice) of the kept rows


def _blocks(
    blocks: Iterable[SourceBlock],
    stats: StatsRecorder,
    keep_rows: Callable[[SourceBlock], np.ndarray] | None,
) -> Iterator[_Block]:
    it = iter(blocks)
    while True:
        t0 = time.perf_counter()
        try:
            sb = next(it)
        except StopIteration:
            return
        finally:
            stats.add_time("source", time.perf_counter() - t0)
        stats.add_block()
        if sb.num_rows is None:
            raise ValueError(
                "a block's metadata has no row count; transport='nixl'/'shm' plans batches "
                "from row counts without fetching blocks: use transport='local' for this dataset"
            )
        if not sb.num_rows:
            continue
        keep = None
        if keep_rows is not None:
            t0 = time.perf_counter()
            keep = np.asarray(keep_rows(sb), dtype=np.int64)
            stats.add_time("batching", time.perf_counter() - t0)
            if len(keep) == sb.num_rows:
                keep = None
        rows = sb.num_rows if keep is None else len(keep)
        if rows:
            base = sb.rows[0] if sb.rows is not None else 0
            yield _Block(sb.ref, base, rows, sb.size_bytes / sb.num_rows, rows, keep)


def _plan(idx: int, parts: list[tuple[_Block, int, int]], take: np.ndarray | None) -> BatchPlan:
    """``parts``: (block, first, stop) ranges of each block's planned rows (its kept rows
    when resuming); ``take``: positions in their concatenation, in batch order, or None."""
    refs: dict[Any, int] = {}
    pieces = []
    nbytes = 0.0
    planned = sum(hi - lo for _, lo, hi in parts)
    if all(blk.keep is None for blk, _, _ in parts):
        for blk, lo, hi in parts:
            i = refs.setdefault(blk.ref, len(refs))
            pieces.append((i, blk.base + lo, blk.base + hi))
            nbytes += blk.row_bytes * (hi - lo)
    else:  # resuming: kept rows are not contiguous, so gather them with `take`
        positions, offset = [], 0
        for blk, lo, hi in parts:
            real = blk.keep[lo:hi] if blk.keep is not None else np.arange(lo, hi)
            first, stop = int(real[0]), int(real[-1]) + 1
            i = refs.setdefault(blk.ref, len(refs))
            pieces.append((i, blk.base + first, blk.base + stop))
            positions.append(offset + real - first)
            offset += stop - first
            nbytes += blk.row_bytes * (hi - lo)
        gather = np.concatenate(positions)
        take = gather if take is None else gather[take]
    rows = len(take) if take is not None else planned
    nbytes = nbytes * rows / max(1, planned)
    return BatchPlan(idx, tuple(refs), tuple(pieces), rows, int(nbytes), take)


def kept_rows(
    block: Any, rows: tuple[int, int] | None, consumed: Any, id_column: str
) -> np.ndarray:
    """Offsets (in the stream's slice of ``block``) of the rows whose ID is not in
    ``consumed`` (see ``kernels.ids.consumed_mask``) — what ``resume.drop_consumed`` keeps.
    Runs as a Ray task by the block."""
    table = to_arrow(block)
    if rows is not None:
        table = table.slice(rows[0], rows[1] - rows[0])
    check_column(id_column, table.column_names)
    if table.num_rows == 0:
        return np.arange(0)
    return np.flatnonzero(~consumed_mask(ids_as_uint64(table.column(id_column)), consumed))


def plan_batches(
    blocks: Iterable[SourceBlock],
    *,
    batch_size: int,
    drop_last: bool = False,
    shuffle_buffer_size: int | None = None,
    shuffle_seed: int | None = None,
    epoch: int = 0,
    stats: StatsRecorder | None = None,
    keep_rows: Callable[[SourceBlock], np.ndarray] | None = None,
) -> Iterator[BatchPlan]:
    """Stage 3 on metadata: the same batches as ``blocks_to_batches`` for the same blocks
    (same rows, same order, same shuffle for the same seed and epoch), as plans.

    ``keep_rows(block)``: when resuming with rows to drop, the offsets of the rows to keep
    (``kept_rows``, run by the block); plans then cover only those, as stage 3 would after
    ``drop_keys``. The one place this path looks at data, and only at the ID column.
    """
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be >= 1")
    stats = stats if stats is not None else StatsRecorder()
    stream = _blocks(blocks, stats, keep_rows)
    if shuffle_buffer_size:
        draws = ShuffleDraw(shuffle_seed, epoch, shuffle_buffer_size, batch_size)
        yield from _shuffled_plans(stream, drop_last, draws, stats)
    else:
        yield from _sequential_plans(stream, batch_size, drop_last, stats)


def _emit(plan: BatchPlan, stats: StatsRecorder) -> BatchPlan:
    stats.buffer(1, plan.nbytes)
    return plan


def _sequential_plans(
    stream: Iterator[_Block], batch_size: int, drop_last: bool, stats: StatsRecorder
) -> Iterator[BatchPlan]:
    idx = 0
    carry: list[tuple[_Block, int, int]] = []
    carry_rows = 0
    for blk in stream:
        offset = 0
        while offset < blk.rows:
            take = min(batch_size - carry_rows, blk.rows - offset)
            carry.append((blk, offset, offset + take))
            carry_rows += take
            offset += take
            if carry_rows == batch_size:
                yield _emit(_plan(idx, carry, None), stats)
                idx += 1
                carry, carry_rows = [], 0
    if carry_rows:
        if drop_last:
            stats.add_dropped(carry_rows, "drop_last=True (last partial batch)")
        else:
            yield _emit(_plan(idx, carry, None), stats)


def _shuffled_plans(
    stream: Iterator[_Block], drop_last: bool, draws: ShuffleDraw, stats: StatsRecorder
) -> Iterator[BatchPlan]:
    # Stage 3's own draw (batching.ShuffleDraw), on positions in the concatenation of the
    # planned rows: the same generator calls on the same number of live rows, in the same
    # order, pick the same rows as the local path.
    blocks: list[_Block] = []
    starts: list[int] = []
    total = 0
    idx = 0

    def draw(count: int) -> BatchPlan:
        nonlocal idx
        t0 = time.perf_counter()
        rows = draws.draw(count)
        which = np.searchsorted(np.asarray(starts), rows, side="right") - 1
        take = np.empty(count, dtype=np.int64)
        parts = []
        offset = 0
        for j in np.unique(which):
            mask = which == j
            local = rows[mask] - starts[j]
            lo, hi = int(local.min()), int(local.max()) + 1
            take[mask] = offset + (local - lo)
            offset += hi - lo
            blk = blocks[j]
            parts.append((blk, lo, hi))
            blk.live -= int(mask.sum())
        plan = _plan(idx, parts, take)
        for blk, _, _ in parts:
            if blk.live == 0:
                blk.ref = None  # fully planned: the plans hold what is still needed
        idx += 1
        stats.add_time("batching", time.perf_counter() - t0)
        return _emit(plan, stats)

    for blk in stream:
        blocks.append(blk)
        starts.append(total)
        draws.add(np.arange(total, total + blk.rows))
        total += blk.rows
        while draws.full():
            yield draw(draws.batch_size)
    while len(draws) >= draws.batch_size:
        yield draw(draws.batch_size)
    if len(draws):
        if drop_last:
            stats.add_dropped(len(draws), "drop_last=True (last partial batch)")
        else:
            yield draw(len(draws))
