"""Stage 3: batching, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from torch_raydata.pipeline.batching import blocks_to_batches
from torch_raydata.pipeline.stats import StatsRecorder
from torch_raydata.pipeline.types import SourceBlock

from .fakes import make_blocks


def _pairs(tables, rows=None):
    return [
        (SourceBlock(ref=i, size_bytes=t.nbytes, num_rows=t.num_rows, rows=(rows or {}).get(i)), t)
        for i, t in enumerate(tables)
    ]


def _ids(batches):
    return np.concatenate([b.table().column("id").to_numpy() for b in batches])


def test_batches_span_block_edges_and_keep_every_row():
    tables = make_blocks([3, 5, 0, 7, 1, 4])
    batches = list(blocks_to_batches(_pairs(tables), batch_size=4))
    assert [b.num_rows for b in batches] == [4, 4, 4, 4, 4]
    assert [b.idx for b in batches] == list(range(5))
    assert _ids(batches).tolist() == list(range(20))


def test_spans_name_the_block_rows_of_each_batch():
    """Each batch carries (block, start, stop) spans: the per-block views stage 4 copies
    from. They must cover exactly the batch's rows, in order, across block edges and
    block row slices (a DDP shard's part of a block)."""
    tables = make_blocks([3, 5, 0, 7, 1, 4])
    pairs = _pairs(tables, rows={3: (2, 6)})
    batches = list(blocks_to_batches(pairs, batch_size=4))
    assert sum(b.num_rows for b in batches) == 3 + 5 + 4 + 1 + 4
    for b in batches:
        assert b.spans is not None and b.rows is None
        rebuilt = pa.concat_tables([blk.table.slice(a, z - a) for blk, a, z in b.spans])
        assert rebuilt.equals(b.data)
    blocks = {id(blk) for b in batches for blk, _, _ in b.spans}
    assert len(blocks) == 5  # one BlockViews per non-empty block, shared by its batches


def test_slices_are_zero_copy():
    t = make_blocks([100])[0]
    (b,) = list(blocks_to_batches(_pairs([t.slice(10, 50)]), batch_size=50))
    src = t.column("id").chunk(0).buffers()[1].address
    got = b.table().column("id").chunk(0).buffers()[1].address
    assert got == src  # same Arrow buffer, sliced by offset: no copy in stage 3


def test_last_partial_batch_kept_or_dropped_and_counted():
    tables = make_blocks([5, 5])
    kept = list(blocks_to_batches(_pairs(tables), batch_size=4))
    assert [b.num_rows for b in kept] == [4, 4, 2]
    stats = StatsRecorder()
    dropped = list(blocks_to_batches(_pairs(tables), batch_size=4, drop_last=True, stats=stats))
    assert [b.num_rows for b in dropped] == [4, 4]
    assert stats.rows_dropped == 2


def test_block_row_slice_is_respected():
    tables = make_blocks([10, 10])
    batches = list(blocks_to_batches(_pairs(tables, rows={0: (2, 5)}), batch_size=100))
    assert _ids(batches).tolist() == [2, 3, 4] + list(range(10, 20))


def test_ids_travel_with_the_batch():
    batches = list(blocks_to_batches(_pairs(make_blocks([7, 6])), batch_size=5, id_column="id"))
    for b in batches:
        assert b.ids.tolist() == b.table().column("id").to_pylist()


@pytest.mark.parametrize("shuffle", [None, 16])
@pytest.mark.parametrize("pattern", ["prefix", "scattered"])
def test_consumed_rows_are_dropped_and_gathered_in_stage_4(pattern, shuffle):
    """Resume in stage 3: a consumed prefix becomes zero-copy slices; scattered consumed
    rows are skipped by position and gathered by the collate threads (Batch.rows), never
    copied out here. Either way every other row comes once, with its ID."""
    from torch_raydata.resume import ids_as_uint64

    tables = make_blocks([40, 25, 33])
    consumed = np.arange(30) if pattern == "prefix" else np.arange(0, 98, 3)
    keys = np.sort(ids_as_uint64(consumed))
    batches = list(
        blocks_to_batches(
            _pairs(tables), batch_size=8, id_column="id", drop_keys=keys,
            shuffle_buffer_size=shuffle, shuffle_seed=0,
        )
    )
    if pattern == "scattered" or shuffle:
        assert any(b.rows is not None for b in batches)  # gathered later, not copied here
    if pattern == "prefix" and not shuffle:
        assert all(b.rows is None for b in batches)
    got = _ids(batches)
    assert sorted(got.tolist()) == sorted(set(range(98)) - set(consumed.tolist()))
    for b in batches:
        assert b.ids.tolist() == b.table().column("id").to_pylist()
        assert b.num_rows == b.table().num_rows


def test_unknown_id_column_names_the_columns():
    with pytest.raises(ValueError, match=r"id_column='nope'.*\['id', 'x'\]"):
        list(blocks_to_batches(_pairs(make_blocks([3])), batch_size=2, id_column="nope"))


def test_null_ids_rejected():
    t = pa.table({"id": pa.array([1, None, 3])})
    with pytest.raises(ValueError, match="null"):
        list(blocks_to_batches(_pairs([t]), batch_size=2, id_column="id"))


def _shuffled_ids(seed, epoch, sizes=(50, 30, 70, 10, 40), buffer=60, bs=16):
    batches = list(
        blocks_to_batches(
            _pairs(make_blocks(list(sizes))),
            batch_size=bs,
            shuffle_buffer_size=buffer,
            shuffle_seed=seed,
            epoch=epoch,
        )
    )
    return _ids(batches), [b.num_rows for b in batches]


def test_shuffle_keeps_every_row_once_and_is_reproducible_per_seed_and_epoch():
    a, sizes = _shuffled_ids(seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(200))
    assert sizes[:-1] == [16] * (len(sizes) - 1)
    assert a.tolist() != list(range(200))
    b, _ = _shuffled_ids(seed=3, epoch=0)
    assert a.tolist() == b.tolist()  # same seed + epoch -> same order
    c, _ = _shuffled_ids(seed=3, epoch=1)
    assert a.tolist() != c.tolist()  # a new order each epoch
    d, _ = _shuffled_ids(seed=4, epoch=0)
    assert a.tolist() != d.tolist()


def test_shuffle_buffer_larger_than_dataset_and_drop_last():
    stats = StatsRecorder()
    batches = list(
        blocks_to_batches(
            _pairs(make_blocks([7, 8])),
            batch_size=4,
            drop_last=True,
            shuffle_buffer_size=1000,
            shuffle_seed=0,
            stats=stats,
        )
    )
    ids = _ids(batches)
    assert len(ids) == 12 and len(set(ids.tolist())) == 12
    assert stats.rows_dropped == 3


def test_shuffle_mixes_rows_across_blocks():
    ids, _ = _shuffled_ids(seed=0, epoch=0, sizes=(100, 100), buffer=150, bs=50)
    first = ids[:50]
    assert (first >= 100).any() and (first < 100).any()


def test_pandas_block_is_converted():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"id": np.arange(6)})
    batches = list(
        blocks_to_batches([(SourceBlock(ref=0, size_bytes=48, num_rows=6), df)], batch_size=4)
    )
    assert _ids(batches).tolist() == list(range(6))


def test_unknown_block_type_is_a_clear_error():
    with pytest.raises(TypeError, match="pyarrow.Table or pandas.DataFrame"):
        list(blocks_to_batches([(SourceBlock(ref=0, size_bytes=1), [1, 2])], batch_size=2))


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size=0"):
        list(blocks_to_batches([], batch_size=0))
