"""BufferPool: memory is reused only after every view of a batch is gone."""

from __future__ import annotations

import gc
import pickle

import numpy as np
import torch

from torch_raydata.memory.buffers import BufferPool


def test_shape_dtype_and_small_requests_bypass_the_pool():
    pool = BufferPool(min_bytes=1024)
    t = pool((4, 3, 64), torch.float32)
    assert t.shape == (4, 3, 64) and t.dtype == torch.float32 and t.is_contiguous()
    small = pool((2,), torch.int64)
    assert small.shape == (2,) and pool.misses == 1  # the small one never touched the pool
    for dt in (torch.bool, torch.uint8, torch.float16, torch.int64, torch.float64):
        x = pool((512, 3), dt)
        x.fill_(1)
        assert x.dtype == dt and bool(x.all())


def test_memory_returns_only_when_the_last_view_dies():
    pool = BufferPool(min_bytes=0)
    t = pool((1024,), torch.uint8)
    addr = t.data_ptr()
    view = t[10:20]
    arr = view.numpy()
    del t
    gc.collect()
    assert pool.free_bytes == 0  # a slice and a numpy view still see it
    del view
    gc.collect()
    assert pool.free_bytes == 0
    arr[:] = 7
    del arr
    gc.collect()
    assert pool.free_bytes == 1024
    again = pool((1024,), torch.uint8)
    assert again.data_ptr() == addr and pool.hits == 1


def test_live_batches_never_share_memory():
    pool = BufferPool(min_bytes=0)
    live = [pool((256,), torch.int32) for _ in range(8)]
    for i, t in enumerate(live):
        t.fill_(i)
    assert len({t.data_ptr() for t in live}) == 8
    assert [int(t[0]) for t in live] == list(range(8))


def test_free_list_is_bounded():
    pool = BufferPool(max_free_bytes=2048, min_bytes=0)
    ts = [pool((1024,), torch.uint8) for _ in range(5)]
    del ts
    gc.collect()
    assert pool.free_bytes == 2048


def test_pickles_as_an_empty_pool():
    pool = BufferPool(max_free_bytes=4096, min_bytes=0)
    t = pool((100,), torch.uint8)
    del t
    gc.collect()
    clone = pickle.loads(pickle.dumps(pool))
    assert clone.free_bytes == 0 and clone.max_free_bytes == 4096
    assert np.asarray(clone((10,), torch.uint8).numpy()).shape == (10,)


def test_numpy_allocation_shares_the_pool_and_the_lease():
    """empty_numpy (DefaultCollate's per-block path) hands out the same leased memory: a
    tensor made from it keeps it until the tensor and its views die."""
    pool = BufferPool(min_bytes=0)
    arr = pool.empty_numpy((4, 8), np.dtype(np.float32))
    assert arr.shape == (4, 8) and arr.dtype == np.float32 and arr.flags.c_contiguous
    t = torch.from_numpy(arr)
    addr = t.data_ptr()
    row = t[1]
    del arr, t
    gc.collect()
    assert pool.free_bytes == 0  # the row still sees it
    del row
    gc.collect()
    assert pool.free_bytes == 128
    again = pool((32,), torch.float32)  # the torch-side allocation reuses the same buffer
    assert again.data_ptr() == addr and pool.hits == 1
    small = BufferPool(min_bytes=1024)
    assert small.empty_numpy((2,), np.dtype(np.int64)).shape == (2,)
    assert small.misses == 0 and small.hits == 0  # below min_bytes: plain np.empty
