"""Stage 3: batching — resolved blocks -> ``Batch(idx, table, ids)``.

Owns: cutting the block stream into ``batch_size`` rows (zero-copy Arrow slices; a batch
may span block edges), ``drop_last``, the seeded local shuffle, and the row IDs carried
with each batch. Does not own: fetching (stage 2) or conversion to tensors (stage 4).

Runs on whichever stage-4 worker holds the input lock, so it is sequential and its output
order (and shuffle) is deterministic for a given block order.

Local shuffle: a buffer of at least ``shuffle_buffer_size`` rows (plus one batch) is kept;
each batch is a uniform draw without replacement from the buffer. The buffer is a
zero-copy concatenation of blocks plus an array of live row positions, so a row is
copied once (into its batch, by the collate threads) rather than on every reshuffle.
When dead rows outnumber live ones, blocks with no live row are let go and the few live
rows of mostly drawn blocks are copied out (``_compact``): at most 1/8 of the rows are
copied twice, and the rows held stay under 8x the live ones. The generator is seeded with ``(seed, epoch)``:
a different order each epoch, the same order for the same seed, epoch and block order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from .._checks import check_int
from ..kernels.ids import check_column, column_ids, split_consumed
from ..kernels.take import BlockViews, take_rows
from .errors import annotate
from .stats import StatsRecorder
from .types import Batch, SourceBlock

__all__ = ["ShuffleDraw", "blocks_to_batches", "num_batches", "to_arrow"]


def num_batches(rows: int | None, batch_size: int, drop_last: bool) -> int | None:
    """Batches stage 3 makes of ``rows`` rows (None: unknown): ``ceil(rows / batch_size)``,
    ``floor`` with ``drop_last``, whatever the block boundaries and the shuffle."""
    if rows is None:
        return None
    return rows // batch_size if drop_last else -(-rows // batch_size)


def to_arrow(block: Any) -> pa.Table:
    """A resolved Ray block as an Arrow table (pandas blocks are converted, one copy)."""
    if isinstance(block, pa.Table):
        return block
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas ships with ray[data]
        pd = None
    if pd is not None and isinstance(block, pd.DataFrame):
        return pa.Table.from_pandas(block, preserve_index=False)
    raise TypeError(
        f"stage 3 (batching) got a block of type {type(block).__name__}; expected a "
        "pyarrow.Table or pandas.DataFrame (a Ray Data block)"
    )


class ShuffleDraw:
    """The local shuffle's draw: one seeded generator per epoch and one way to pick a batch.

    Shared by stage 3 (below) and the remote epoch's plans (``transports/nixl/plan.py``),
    so both paths give the same batches for the same block order: they differ only in
    what a position stands for (a row of the buffered blocks here, of the planned rows
    there). ``live`` holds the positions not drawn yet, in stream order; a caller appends
    each block's rows with :meth:`add` and may renumber them if it keeps their order
    (``_compact``). Seeded with ``(seed, epoch)``: a new order each epoch, the same order
    for the same seed, epoch and block order (no seed: a fresh order every time).
    """

    def __init__(self, seed: int | None, epoch: int, buffer_rows: int, batch_size: int) -> None:
        self.rng = np.random.default_rng(None if seed is None else [seed, epoch])
        self.buffer_rows = buffer_rows
        self.batch_size = batch_size
        self.live = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.live)

    def add(self, positions: np.ndarray) -> None:
        """A block's rows joined the buffer (positions after every live one)."""
        self.live = np.concatenate([self.live, positions])

    def full(self) -> bool:
        """The buffer holds ``buffer_rows`` beyond a batch: draw while the stream flows."""
        return len(self.live) >= self.buffer_rows + self.batch_size

    def draw(self, count: int) -> np.ndarray:
        """``count`` live positions drawn uniformly without replacement, ascending (so a
        gather walks each block forwards; the batch is the same draw); they leave ``live``."""
        pick = np.sort(self.rng.choice(len(self.live), size=count, replace=False))
        rows = self.live[pick]
        self.live = np.delete(self.live, pick)
        return rows


class _Batcher:
    def __init__(
        self,
        batch_size: int,
        drop_last: bool,
        id_column: str | None,
        stats: StatsRecorder,
        start_idx: int,
    ) -> None:
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.id_column = id_column
        self.stats = stats
        self.idx = start_idx
        self._checked_schema: pa.Schema | None = None

    def check(self, table: pa.Table) -> None:
        if self._checked_schema is not None and table.schema.equals(self._checked_schema):
            return
        if self.id_column is not None:
            check_column(self.id_column, table.column_names)
        self._checked_schema = table.schema

    def make(
        self,
        table: pa.Table,
        row_bytes: float,
        rows: np.ndarray | None = None,
        ids: np.ndarray | None = None,
        spans: tuple[tuple[BlockViews, int, int], ...] | None = None,
    ) -> Batch:
        """The next batch: ``table``, or (``rows`` given) those rows of it with their ``ids``."""
        if rows is None and self.id_column is not None:
            ids = column_ids(table, self.id_column)
        num_rows = table.num_rows if rows is None else len(rows)
        # Estimated from the block's size: Table.nbytes on a slice walks every buffer of
        # every column (8.7% of the busy time on a tensor-column workload, profiled).
        nbytes = int(row_bytes * num_rows)
        batch = Batch(
            idx=self.idx,
            data=table,
            num_rows=num_rows,
            nbytes=nbytes,
            ids=ids,
            rows=rows,
            spans=spans,
        )
        self.idx += 1
        self.stats.buffer(1, nbytes)
        return batch


def blocks_to_batches(
    blocks: Iterable[tuple[SourceBlock, Any]],
    *,
    batch_size: int,
    drop_last: bool = False,
    shuffle_buffer_size: int | None = None,
    shuffle_seed: int | None = None,
    epoch: int = 0,
    id_column: str | None = None,
    stats: StatsRecorder | None = None,
    start_idx: int = 0,
    drop_keys: Any = None,
) -> Iterator[Batch]:
    """Cut ``(SourceBlock, block)`` pairs into batches of ``batch_size`` rows.

    Every row of the input appears in exactly one batch, except the final partial batch
    when ``drop_last`` (its rows are counted in ``stats.rows_dropped``) and rows whose ID
    key is in ``drop_keys`` (a consumed set, see ``kernels.ids.consumed_mask``: resume, when the
    filter cannot run on the cluster).
    """
    batch_size = check_int("batch_size", batch_size, 1)
    stats = stats if stats is not None else StatsRecorder()
    b = _Batcher(batch_size, drop_last, id_column, stats, start_idx)
    tables = _tables(blocks, b, stats, drop_keys)
    try:
        if shuffle_buffer_size:
            draws = ShuffleDraw(shuffle_seed, epoch, shuffle_buffer_size, batch_size)
            yield from _shuffled(tables, b, draws, stats)
        else:
            yield from _sequential(tables, b, stats)
    except Exception as e:  # name this stage (an error from stage 2 keeps its own note)
        raise annotate(e, f"stage 3 (batching), batch {b.idx}") from None


def _tables(
    blocks: Iterable[tuple[SourceBlock, Any]],
    b: _Batcher,
    stats: StatsRecorder,
    drop_keys: Any = None,
) -> Iterator[tuple[pa.Table, float, np.ndarray | None]]:
    """Non-empty tables of the stream with their average bytes per row, and the positions
    of their rows in the stream when that is not all of them (resume: scattered consumed
    rows are skipped by position, gathered later in stage 4, not copied out here)."""
    for sb, block in blocks:
        table = to_arrow(block)
        row_bytes = table.nbytes / table.num_rows if table.num_rows else 0.0
        if sb.rows is not None:
            start, stop = sb.rows
            table = table.slice(start, stop - start)
        rows = None
        if drop_keys is not None and b.id_column is not None and table.num_rows:
            b.check(table)
            table, rows = split_consumed(table, drop_keys, b.id_column)
        if table.num_rows and (rows is None or len(rows)):
            b.check(table)
            yield table, row_bytes, rows


def _sequential(
    tables: Iterator[tuple[pa.Table, float, np.ndarray | None]], b: _Batcher, stats: StatsRecorder
) -> Iterator[Batch]:
    # Pieces of the next batch: (zero-copy slice, None, its span of the block) or (whole
    # table, its row positions to gather, the whole block as a span).
    carry: list[tuple[pa.Table, np.ndarray | None, tuple[BlockViews, int, int]]] = []
    carry_rows = 0
    row_bytes = 0.0
    for table, row_bytes, rows in tables:
        offset = 0
        n = table.num_rows if rows is None else len(rows)
        block = BlockViews(table)
        while offset < n:
            t0 = time.perf_counter()
            take = min(b.batch_size - carry_rows, n - offset)
            if rows is None:
                carry.append((table.slice(offset, take), None, (block, offset, offset + take)))
            else:  # the whole table, and which of its rows
                carry.append((table, rows[offset : offset + take], (block, 0, table.num_rows)))
            carry_rows += take
            offset += take
            batch = None
            if carry_rows == b.batch_size:
                batch = _carried(carry, b, row_bytes)
                carry, carry_rows = [], 0
            stats.add_time("batching", time.perf_counter() - t0)
            if batch is not None:
                # Lazily, one at a time: a batch exists (and is counted as buffered) only
                # once the collate pool asks for it.
                yield batch
        del block  # the last batch's spans keep it until collated, no longer
    if carry_rows:
        if b.drop_last:
            stats.add_dropped(carry_rows, "drop_last=True (last partial batch)")
        else:
            yield _carried(carry, b, row_bytes)


def _carried(
    carry: list[tuple[pa.Table, np.ndarray | None, tuple[BlockViews, int, int]]],
    b: _Batcher,
    row_bytes: float,
) -> Batch:
    """One batch from its pieces: a zero-copy table with the blocks' spans, plus row
    positions to gather in stage 4 when a piece is a subset of its table."""
    tables = [t for t, _, _ in carry]
    data = tables[0] if len(tables) == 1 else pa.concat_tables(tables)  # zero-copy
    spans = tuple(s for _, _, s in carry)
    if all(r is None for _, r, _ in carry):
        return b.make(data, row_bytes, spans=spans)
    positions, offset = [], 0
    for t, r, _ in carry:
        positions.append((np.arange(t.num_rows) if r is None else r) + offset)
        offset += t.num_rows
    rows = np.concatenate(positions)
    ids = column_ids(data, b.id_column)[rows] if b.id_column is not None else None
    return b.make(data, row_bytes, rows=rows, ids=ids, spans=spans)


#: A buffered piece (block) with fewer live rows than 1/LIVE_FRACTION of its rows has them
#: copied out, freeing the piece; fuller pieces stay zero-copy. Bounds the rows held to
#: LIVE_FRACTION x the live rows (plus one piece), while copying at most 1/LIVE_FRACTION
#: of the rows a second time.
LIVE_FRACTION = 8


def _compact(
    pieces: list[BlockViews], live: np.ndarray
) -> tuple[list[BlockViews], np.ndarray, int]:
    """Drop the pieces whose rows were all drawn; copy the few live rows out of mostly
    drawn ones. Keeps the live rows in stream order (``live`` stays ascending), so the
    shuffle draws the same rows as before (and as the remote path's plans)."""
    bounds = np.cumsum([0] + [p.table.num_rows for p in pieces])
    which = np.searchsorted(bounds, live, side="right") - 1
    counts = np.bincount(which, minlength=len(pieces))
    kept: list[BlockViews] = []
    positions: list[np.ndarray] = []
    total = 0
    for k, piece in enumerate(pieces):
        if counts[k] == 0:
            continue
        local = live[which == k] - bounds[k]
        if counts[k] * LIVE_FRACTION < piece.table.num_rows:
            piece, local = BlockViews(take_rows(piece.table, local)), np.arange(counts[k])
        kept.append(piece)
        positions.append(local + total)
        total += piece.table.num_rows
    return kept, np.concatenate(positions) if positions else live[:0], total


def _shuffled(
    tables: Iterator[tuple[pa.Table, float, np.ndarray | None]],
    b: _Batcher,
    draws: ShuffleDraw,
    stats: StatsRecorder,
) -> Iterator[Batch]:
    pieces: list[BlockViews] = []  # zero-copy parts of the buffer table (blocks)
    total = 0  # rows in concat(pieces); draws.live: positions in it not yet emitted
    row_bytes = 0.0  # running average over the blocks seen

    buffer_ids: np.ndarray | None = None  # id_column of the current buffer, as keys

    def draw(buffer: tuple[pa.Table, tuple[tuple[BlockViews, int, int], ...]], count: int) -> Batch:
        rows = draws.draw(count)
        ids = buffer_ids[rows] if buffer_ids is not None else None
        # The gather (the batch's one copy) runs in stage 4, outside the input lock.
        return b.make(buffer[0], row_bytes, rows=rows, ids=ids, spans=buffer[1])

    def rebuilt() -> tuple[pa.Table, tuple[tuple[BlockViews, int, int], ...]]:
        """The buffer as one zero-copy table, and its pieces as spans (whose views the
        gather reuses)."""
        nonlocal buffer_ids
        table = pa.concat_tables([p.table for p in pieces])
        if b.id_column is not None:
            buffer_ids = column_ids(table, b.id_column)
        return table, tuple((p, 0, p.table.num_rows) for p in pieces)

    for table, block_row_bytes, kept in tables:
        t0 = time.perf_counter()
        row_bytes = (row_bytes * total + block_row_bytes * table.num_rows) / (
            total + table.num_rows
        )
        pieces.append(BlockViews(table))
        fresh = np.arange(total, total + table.num_rows)
        draws.add(fresh if kept is None else fresh[kept])
        total += table.num_rows
        stats.add_time("batching", time.perf_counter() - t0)
        if draws.full():
            buffer = rebuilt()
            while draws.full():
                t0 = time.perf_counter()
                batch = draw(buffer, b.batch_size)
                stats.add_time("batching", time.perf_counter() - t0)
                yield batch
            if total - len(draws) > len(draws):  # more dead rows than live ones
                t0 = time.perf_counter()
                pieces, draws.live, total = _compact(pieces, draws.live)
                stats.add_time("batching", time.perf_counter() - t0)
    # Drain: the source is exhausted, emit what is left in random order.
    if len(draws):
        buffer = rebuilt()
        while len(draws) >= b.batch_size:
            yield draw(buffer, b.batch_size)
        if len(draws):
            if b.drop_last:
                stats.add_dropped(len(draws), "drop_last=True (last partial batch)")
            else:
                yield draw(buffer, len(draws))
