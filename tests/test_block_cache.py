"""pipeline.block_cache: a MaterializedDataset's blocks deserialized once per dataset."""

from __future__ import annotations

import pyarrow as pa
import pytest

from torch_raydata.pipeline.block_cache import BlockCache

from .fakes import FakeFetcher, make_blocks


def _store(n: int = 4, rows: int = 10) -> dict[str, pa.Table]:
    return {f"b{i}": t for i, t in enumerate(make_blocks([rows] * n))}


def test_second_pass_is_served_without_fetching():
    store = _store()
    inner = FakeFetcher(store)
    cache = BlockCache(1 << 30)
    refs = list(store)
    assert cache.fetcher(inner).get(refs) == [store[r] for r in refs]
    assert len(cache) == 4 and cache.bytes == sum(t.nbytes for t in store.values())
    inner.get_calls.clear()
    inner.wait_calls.clear()
    again = cache.fetcher(inner)  # the next epoch's fetcher, same cache
    assert again.wait(refs, timeout=0.1) == refs
    assert again.get(refs) == [store[r] for r in refs]
    assert inner.get_calls == [] and inner.wait_calls == []
    assert cache.hits == 4


def test_budget_bounds_what_is_kept_and_every_block_is_still_served():
    store = _store()
    one = next(iter(store.values())).nbytes
    cache = BlockCache(2 * one)
    inner = FakeFetcher(store)
    refs = list(store)
    assert cache.fetcher(inner).get(refs) == [store[r] for r in refs]
    assert len(cache) == 2 and cache.bytes == 2 * one
    inner.get_calls.clear()
    assert cache.fetcher(inner).get(refs) == [store[r] for r in refs]
    assert inner.get_calls == [refs[2:]]  # only the blocks beyond the budget


def test_wait_mixes_cached_and_fetched_refs_in_order():
    store = _store()
    cache = BlockCache(1 << 30)
    cache.fetcher(FakeFetcher(store)).get(["b1"])
    inner = FakeFetcher(store, ready=lambda r: r == "b3")
    f = cache.fetcher(inner)
    assert f.wait(["b0", "b1", "b2", "b3"], timeout=0.0) == ["b1", "b3"]
    # One cached block already satisfies num_returns=1: nothing waits, the rest is started.
    assert f.wait(["b0", "b1"], timeout=5.0, num_returns=1) == ["b1"]
    assert inner.wait_calls[-1] == (["b0"], 0, 1)


def test_clear_drops_every_block():
    store = _store()
    cache = BlockCache(1 << 30)
    cache.fetcher(FakeFetcher(store)).get(list(store))
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


@pytest.mark.usefixtures("ray_session")
def test_dataset_keeps_a_materialized_datasets_blocks_and_releases_them_on_close():
    import ray

    import torch_raydata as trd

    mat = ray.data.range(1000, override_num_blocks=5).materialize()
    ds = trd.RayIterableDataset(mat, batch_size=64)
    first = sorted(int(x) for b in ds for x in b["id"])
    s = ds.stats()
    assert s.cached_blocks == 5 and s.cached_block_bytes > 0
    assert "kept deserialized" in str(s)
    second = sorted(int(x) for b in ds for x in b["id"])
    assert first == second == list(range(1000))
    assert ds._block_cache.hits >= 5  # epoch 2 came from the cache
    ds.close()
    assert ds.stats().cached_blocks == 0

    streamed = trd.RayIterableDataset(ray.data.range(200, override_num_blocks=2), batch_size=64)
    assert sum(len(b["id"]) for b in streamed) == 200
    assert streamed.stats().cached_blocks == 0  # a new execution every epoch: nothing kept
    streamed.close()
