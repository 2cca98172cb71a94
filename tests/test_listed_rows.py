"""The first epoch's row count from the file listing's footers (the prestart's lead).

``read_parquet(...).map(...)``: Ray cannot count the rows without executing, but the
listing made at the first epoch carries every row group's footer row count; when every
operator after the read keeps every row, that sum is the epoch's exact count. Anything
that may drop or add rows gives None (never a wrong count).
"""

from __future__ import annotations

import numpy as np
import pytest

import torch_raydata as trd
from torch_raydata.pipeline.prestart import NextEpoch
from torch_raydata.pipeline.source import RaySource

pytestmark = pytest.mark.usefixtures("ray_session")

ROWS = (150, 97, 3)  # rows per file; 40-row row groups: several chunks per file


@pytest.fixture
def files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = 0
    for f, n in enumerate(ROWS):
        ids = np.arange(start, start + n)
        pq.write_table(
            pa.table({"id": ids, "x": ids * 2.0}), tmp_path / f"part-{f}.parquet", row_group_size=40
        )
        start += n
    return str(tmp_path)


def _listed_rows(ds):
    src = RaySource(ds)
    assert src.listed_rows() is None  # no listing before the first epoch opens
    src._listed(ds)  # what the first epoch's open does
    assert isinstance(src._listing, list) and src._listing
    return src.listed_rows()


KEEP = {
    "read": lambda ds: ds,
    "map": lambda ds: ds.map(lambda r: {"id": r["id"], "y": r["x"] + 1}),
    "select": lambda ds: ds.select_columns(["id"]),
    "drop": lambda ds: ds.drop_columns(["x"]),
    "rename": lambda ds: ds.rename_columns({"x": "y"}),
    "add_column": lambda ds: ds.add_column("z", lambda b: b["id"] * 3),
    "declared_1_to_1": lambda ds: ds.map_batches(lambda b: b, udf_modifying_row_count=False),
    "chain": lambda ds: ds.map(lambda r: r).select_columns(["id"]).map(lambda r: r),
}

CHANGE = {
    "filter": lambda ds: ds.filter(lambda r: r["id"] % 2 == 0),
    "map_batches": lambda ds: ds.map_batches(lambda b: b),
    "flat_map": lambda ds: ds.flat_map(lambda r: [r, r]),
    "limit": lambda ds: ds.limit(10),
    "map_after_filter": lambda ds: ds.filter(lambda r: True).map(lambda r: r),
    "filter_after_map": lambda ds: ds.map(lambda r: r).filter(lambda r: True),
}


@pytest.mark.parametrize("shape", list(KEEP))
def test_row_preserving_plans_are_counted_exactly(files, shape):
    import ray

    ds = KEEP[shape](ray.data.read_parquet(files))
    assert ds._meta_count() is None or shape == "read"  # Ray does not know: we do
    n = _listed_rows(ds)
    # The true number, by executing the plan through our own source (its listing runs in
    # this process; ds.count() would run Ray's ListFiles with 32 footer actors, which hung
    # a clean-clone CI run on this 2-CPU session for 300 s).
    import torch_raydata as trd

    loader = trd.RayIterableDataset(ds, batch_size=64, prestart=False)
    executed = sum(len(next(iter(b.values()))) for b in loader)
    loader.close()
    assert n == sum(ROWS) == executed


@pytest.mark.parametrize("shape", list(CHANGE))
def test_plans_that_may_change_rows_give_none(files, shape):
    import ray

    assert _listed_rows(CHANGE[shape](ray.data.read_parquet(files))) is None


def test_an_expression_filter_or_another_input_gives_none(files):
    import ray
    from ray.data.expressions import col

    filtered = ray.data.read_parquet(files).filter(expr=col("id") < 5)  # may be pushed down
    assert _listed_rows(filtered.map(lambda r: r)) is None
    assert RaySource(ray.data.range(10).map(lambda r: r)).listed_rows() is None  # no files
    assert RaySource(ray.data.read_parquet(files).iterator()).listed_rows() is None


def test_the_first_epoch_leads_with_the_listed_count_and_len_stays_unknown(files, monkeypatch):
    """The count reaches the prestart (expected_rows) at the first epoch; len() and
    num_rows() (used by the DDP cap) do not take it."""
    import ray

    seen = []
    real = NextEpoch.watch

    def watch(self, stream, *, window_rows, expected_rows=None):
        seen.append(expected_rows)
        return real(self, stream, window_rows=window_rows, expected_rows=expected_rows)

    monkeypatch.setattr(NextEpoch, "watch", watch)
    for shape, want in (("map", sum(ROWS)), ("filter", None)):
        seen.clear()
        make = KEEP.get(shape) or CHANGE[shape]
        loader = trd.RayIterableDataset(make(ray.data.read_parquet(files)), batch_size=32)
        rows = sum(len(b["id"]) for b in loader)
        assert seen == [want]
        assert rows == (sum(ROWS) if want else sum(1 for i in range(sum(ROWS)) if i % 2 == 0))
        assert loader.num_rows() is None
        with pytest.raises(TypeError, match="len"):
            len(loader)
        loader.close()
