"""Read units of a file listing split to the cluster's CPUs (``source_listing.split_listing``).

Ray 2.60 packs a parquet listing into units of up to 128 MiB of stored bytes and ignores
``override_num_blocks`` for it: a few files of JPEGs made one read task, so a map fused
into the read ran on one CPU. The epoch's listing is split to ``read_units`` units.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import torch_raydata as trd
from torch_raydata.pipeline import source_listing
from torch_raydata.pipeline.source import RaySource


def _unit(rows: range) -> tuple:
    from ray.data.block import BlockAccessor

    t = pa.table({"path": [f"f{i}" for i in rows]})
    return (t, BlockAccessor.for_block(t).get_metadata(), t.schema)


def _paths(listing) -> list[str]:
    return [p for t, _, _ in listing for p in t.column("path").to_pylist()]


def test_split_keeps_every_listing_row_once_and_in_order():
    listing = [_unit(range(0, 5)), _unit(range(5, 6))]
    out = source_listing.split_listing(listing, 4)
    assert len(out) == 4
    assert _paths(out) == [f"f{i}" for i in range(6)]
    assert all(md.num_rows == t.num_rows for t, md, _ in out)


def _sized(sizes: list[int], start: int = 0) -> tuple:
    from ray.data._internal.datasource_v2.interfaces.file_manifest import FILE_SIZE_COLUMN_NAME
    from ray.data.block import BlockAccessor

    n = len(sizes)
    t = pa.table(
        {"path": [f"f{i}" for i in range(start, start + n)], FILE_SIZE_COLUMN_NAME: sizes}
    )
    return (t, BlockAccessor.for_block(t).get_metadata(), t.schema)


def test_split_halves_the_unit_with_most_file_bytes_and_keeps_units_above_min_bytes():
    mib = 1 << 20
    # one unit of 4 x 1 MiB files, one of 1 x 3 MiB: the 4 MiB unit is split first
    listing = [_sized([mib] * 4), _sized([3 * mib], start=4)]
    out = source_listing.split_listing(listing, 3, min_bytes=mib)
    assert [t.num_rows for t, _, _ in out] == [2, 2, 1]
    assert _paths(out) == [f"f{i}" for i in range(5)]
    # min_bytes: a unit is split only while each half keeps min_bytes on average
    out = source_listing.split_listing(listing, 8, min_bytes=mib)
    assert [t.num_rows for t, _, _ in out] == [1, 1, 1, 1, 1]
    tiny = [_sized([23_000] * 4)]
    assert source_listing.split_listing(tiny, 4, min_bytes=mib) == tiny
    assert len(source_listing.split_listing(tiny, 4, min_bytes=0)) == 4


def test_split_stops_at_one_row_per_unit_and_never_merges():
    listing = [_unit(range(0, 2)), _unit(range(2, 3))]
    assert [t.num_rows for t, _, _ in source_listing.split_listing(listing, 10)] == [1, 1, 1]
    many = [_unit(range(i, i + 1)) for i in range(5)]
    assert source_listing.split_listing(many, 2) == many


@pytest.fixture
def six_files(tmp_path):
    import pyarrow.parquet as pq

    for f in range(6):
        ids = np.arange(f * 50, (f + 1) * 50)
        pq.write_table(pa.table({"id": ids}), tmp_path / f"part-{f}.parquet")
    return str(tmp_path)


@pytest.mark.usefixtures("ray_session")
def test_a_few_files_get_a_read_unit_per_half_cpu_and_every_row_once(six_files, monkeypatch):
    import ray

    monkeypatch.setattr(source_listing, "MIN_SPLIT_BYTES", 0)  # the files are tiny

    ds = ray.data.read_parquet(six_files).map(lambda r: {"id": r["id"]})
    src = RaySource(ds)
    src._listed(ds)  # what the first epoch's open does
    cpus = int(ray.cluster_resources()["CPU"])
    assert len(src._listing) == min(6, source_listing.READ_UNITS_PER_CPU * cpus)
    loader = trd.RayIterableDataset(ds, batch_size=32, id_column="id")
    for _ in range(2):
        ids = sorted(int(i) for b in loader for i in b["id"])
        assert ids == list(range(300))
    loader.close()


@pytest.mark.usefixtures("ray_session")
def test_override_num_blocks_is_honoured_for_parquet(six_files):
    import ray

    ds = ray.data.read_parquet(six_files, override_num_blocks=3)
    src = RaySource(ds)
    src._listed(ds)
    assert len(src._listing) == 3


@pytest.mark.usefixtures("ray_session")
def test_tiny_files_stay_in_one_read_unit(six_files):
    import ray

    ds = ray.data.read_parquet(six_files)
    src = RaySource(ds)
    src._listed(ds)
    assert len(src._listing) == 1  # a few KB: one task reads them all, as Ray packs them
