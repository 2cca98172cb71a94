"""Exact mid-epoch resume (resume.py + RayIterableDataset.state_dict/load_state_dict)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import torch_raydata as trd
from torch_raydata.resume import (
    ConsumedSet,
    drop_consumed,
    hash_strings,
    ids_as_uint64,
    merge_states,
)

HERE = os.path.dirname(__file__)


# -- the ID set, without Ray ----------------------------------------------------------------
def test_consumed_set_round_trip_union_and_sorted_keys():
    a = ConsumedSet()
    a.add(ids_as_uint64(np.array([5, 1, 9])))
    a.add(ids_as_uint64(np.array([100])))
    b = ConsumedSet.decode(a.encode())
    assert b.sorted_keys().tolist() == [1, 5, 9, 100]
    u = b.union(ConsumedSet.decode(ConsumedSet(None).encode())).union(a)
    assert len(u) == 4
    c = ConsumedSet()
    c.add(np.array([7], dtype=np.uint64))
    assert b.union(c).sorted_keys().tolist() == [1, 5, 7, 9, 100]


def test_negative_ids_and_strings_become_stable_keys():
    keys = ids_as_uint64(np.array([-1, 0, 3]))
    assert keys.dtype == np.uint64 and len(set(keys.tolist())) == 3
    h1 = hash_strings(["a", "b", "a"])
    assert h1[0] == h1[2] != h1[1]
    assert ids_as_uint64(pa.array(["a", "b"])).tolist() == hash_strings(["a", "b"]).tolist()
    with pytest.raises(ValueError, match="integer or string"):
        ids_as_uint64(pa.array([1.5, 2.5]))


def test_spill_to_file_when_too_large(tmp_path):
    s = ConsumedSet()
    s.add(np.arange(0, 200_000, 3, dtype=np.uint64))
    with pytest.raises(ValueError, match="spill_dir"):
        s.encode(max_inline_bytes=10)
    enc = s.encode(spill_dir=str(tmp_path), max_inline_bytes=10)
    assert "path" in enc and "bytes" not in enc
    assert len(ConsumedSet.decode(enc)) == len(s)
    os.remove(enc["path"])
    with pytest.raises(ValueError, match="cannot be read"):
        ConsumedSet.decode(enc)


def test_corrupt_or_foreign_encodings_are_clear_errors():
    with pytest.raises(ValueError, match="roaring64"):
        ConsumedSet.decode({"format": "zip"})
    enc = ConsumedSet().encode()
    enc["count"] = 5
    with pytest.raises(ValueError, match="corrupt"):
        ConsumedSet.decode(enc)


def test_drop_consumed_filters_exactly():
    t = pa.table({"id": pa.array(np.arange(20)), "x": pa.array(np.arange(20) * 2)})
    keys = np.sort(ids_as_uint64(np.array([0, 3, 19, 500])))
    out = drop_consumed(t, keys, "id")
    assert out.column("id").to_pylist() == [i for i in range(20) if i not in (0, 3, 19)]
    assert drop_consumed(t, np.empty(0, np.uint64), "id") is t


def test_drop_consumed_slices_long_runs_and_gathers_scattered_holes():
    n = 1000
    img = np.arange(n * 12, dtype=np.uint8).reshape(n, 12)
    t = pa.table(
        {
            "id": pa.array(np.arange(n)),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), 12),
        }
    )
    src = t.column("x").chunk(0).values.buffers()[1].address
    # A prefix consumed (an epoch cut short without a global shuffle): zero-copy slices.
    out = drop_consumed(t, ids_as_uint64(np.arange(300)), "id")
    assert out.column("id").to_pylist() == list(range(300, n))
    assert out.column("x").chunk(0).values.buffers()[1].address == src
    # Every other row consumed (a global shuffle upstream): one gather, same values.
    out = drop_consumed(t, ids_as_uint64(np.arange(0, n, 2)), "id")
    assert out.column("id").to_pylist() == list(range(1, n, 2))
    got = np.asarray(out.column("x").combine_chunks().values).reshape(-1, 12)
    assert np.array_equal(got, img[1::2])


def test_ten_million_ids_fit_a_checkpoint():
    rng = np.random.default_rng(0)
    s = ConsumedSet()
    s.add(np.sort(rng.choice(20_000_000, 10_000_000, replace=False)).astype(np.uint64))
    enc = s.encode()
    assert len(pickle.dumps(enc)) < 4 << 20  # measured 2.5 MB for a random half of 20M


# -- on Ray -----------------------------------------------------------------------------------
# -- merging the ranks' states (no Ray) ------------------------------------------------------
def _rank_state(ids, epoch=0, batches=2, exact=True):
    state = {
        "version": 2,
        "epoch": epoch,
        "batches_consumed": batches,
        "rows_consumed": len(ids),
        "batch_size": 4,
        "exact": exact,
        "world_size": 2,
        "fingerprint": {
            "batch_size": 4,
            "shuffle_seed": 0,
            "id_column": "id" if exact else None,
            "columns": None,
            "num_rows": 100,
        },
    }
    if exact:
        cs = ConsumedSet()
        cs.add(ids_as_uint64(np.asarray(ids)))
        state["consumed"] = cs.encode()
    return state


def test_merge_states_unites_the_ranks_sets():
    merged = merge_states([_rank_state([0, 5, 9, 2]), _rank_state([7, 1, 3, 4], batches=3)])
    assert merged["world_size"] == 2 and merged["rows_consumed"] == 8
    assert merged["batches_consumed"] == 2 and merged["epoch"] == 0
    assert ConsumedSet.decode(merged["consumed"]).sorted_keys().tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    assert merge_states([_rank_state([1])])["world_size"] == 1
    plain = merge_states([_rank_state([], exact=False), _rank_state([], exact=False, batches=1)])
    assert "consumed" not in plain and plain["batches_consumed"] == 1


@pytest.mark.parametrize(
    "states, match",
    [
        ([_rank_state([1, 2]), _rank_state([3], epoch=1)], "differ in epoch"),
        ([_rank_state([1, 2]), _rank_state([2, 3])], "1 IDs were consumed on more than one rank"),
        ([_rank_state([1]), _rank_state([], exact=False)], "differ in exact"),
        ([], "at least one"),
    ],
)
def test_merge_states_refuses_ranks_that_disagree(states, match):
    with pytest.raises(ValueError, match=match):
        merge_states(states)


pytestmark_ray = pytest.mark.usefixtures("ray_session")


def _loader(n=1000, **kw):
    import ray

    ds = ray.data.range(n, override_num_blocks=5)
    args = {"batch_size": 32, "id_column": "id", "shuffle_buffer_size": 200, "shuffle_seed": 0} | kw
    return trd.RayIterableDataset(ds, **args)


def _take(loader, k):
    it = iter(loader)
    got = [next(it)["id"].numpy() for _ in range(k)]
    state = loader.state_dict()
    it.close()
    return got, state


@pytestmark_ray
def test_resume_yields_exactly_the_rest_and_a_second_resume_stays_exact():
    first, sd = _take(_loader(), 10)
    assert sd["exact"] and sd["consumed"]["count"] == 320 and sd["epoch"] == 0
    second_loader = _loader()
    second_loader.load_state_dict(sd)
    second, sd2 = _take(second_loader, 5)
    assert sd2["consumed"]["count"] == 320 + 5 * 32
    third_loader = _loader()
    third_loader.load_state_dict(sd2)
    third = [b["id"].numpy() for b in third_loader]
    ids = np.concatenate(first + second + third)
    assert len(ids) == 1000 and len(np.unique(ids)) == 1000
    # then the next epoch runs in full
    assert third_loader.state_dict()["epoch"] == 1
    assert sum(len(b["id"]) for b in third_loader) == 1000


@pytestmark_ray
def test_resume_at_an_epoch_boundary_neither_skips_nor_repeats():
    loader = _loader()
    for _ in loader:
        pass
    sd = loader.state_dict()
    assert sd["epoch"] == 1 and sd["consumed"]["count"] == 0
    fresh = _loader()
    fresh.load_state_dict(sd)
    ids = np.concatenate([b["id"].numpy() for b in fresh])
    assert sorted(ids.tolist()) == list(range(1000))
    assert fresh.stats().epoch == 1


@pytestmark_ray
def test_stopping_at_len_without_the_end_of_the_epoch_is_a_finished_epoch():
    """A loop that takes exactly len() batches (as Lightning does with a sized loader)
    never sees StopIteration; its epoch is nevertheless over."""
    loader = _loader()
    it = iter(loader)
    last = [next(it)["id"] for _ in range(len(loader))][-1]
    sd = loader.state_dict()
    assert sd["epoch"] == 1 and sd["consumed"]["count"] == 0
    sd = loader._state_dict(consumer_lag=1)  # ... unless the last one is not trained on yet
    assert sd["epoch"] == 0 and sd["consumed"]["count"] == sd["rows_consumed"] == 1000 - len(last)
    assert not set(last.tolist()) & set(ConsumedSet.decode(sd["consumed"]).sorted_keys().tolist())
    it.close()


@pytestmark_ray
def test_state_taken_after_a_break_keeps_the_unfinished_epoch():
    loader = _loader()
    for i, _ in enumerate(loader):
        if i == 2:
            break
    sd = loader.state_dict()
    assert sd["epoch"] == 0 and sd["consumed"]["count"] == 3 * 32


@pytestmark_ray
def test_loaded_state_is_returned_until_the_epoch_starts():
    _, sd = _take(_loader(), 4)
    fresh = _loader()
    fresh.load_state_dict(sd)
    again = fresh.state_dict()
    assert again["epoch"] == 0 and again["consumed"]["count"] == 128


@pytestmark_ray
def test_data_iterator_input_filters_locally_and_stays_exact():
    import ray

    ds = ray.data.range(600, override_num_blocks=4)
    kw = {"batch_size": 50, "id_column": "id"}
    a = trd.RayIterableDataset(ds.iterator(), **kw)
    first, sd = _take(a, 3)
    b = trd.RayIterableDataset(ds.iterator(), **kw)
    b.load_state_dict(sd)
    rest = [x["id"].numpy() for x in b]
    ids = np.concatenate(first + rest)
    assert sorted(ids.tolist()) == list(range(600))


@pytestmark_ray
@pytest.mark.parametrize(
    "change, match",
    [
        ({"id_column": None}, "id_column"),
        ({"n": 999}, "num_rows"),
        ({"batch_size": 16}, "batch_size"),
    ],
)
def test_malformed_or_foreign_state_is_a_clear_error(change, match):
    _, sd = _take(_loader(), 2)
    n = change.pop("n", 1000)
    other = _loader(n=n, **change)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(sd)


@pytestmark_ray
def test_batch_size_may_change_with_strict_false():
    first, sd = _take(_loader(), 3)
    other = _loader(batch_size=50)
    other.load_state_dict(sd, strict=False)
    rest = np.concatenate([b["id"].numpy() for b in other])
    assert sorted(np.concatenate(first + [rest]).tolist()) == list(range(1000))


@pytestmark_ray
def test_not_a_state_is_rejected():
    loader = _loader()
    for bad in ({"foo": 1}, {"version": 99}, "state", {"version": 2, "epoch": 0}):
        with pytest.raises(ValueError):
            loader.load_state_dict(bad)


# -- SIGKILL mid-epoch ----------------------------------------------------------------------
def _run_script(*args, timeout=180):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=os.path.dirname(HERE))
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "scripts", "resume_worker.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path):
    """A trainer checkpoints every 4 steps and is SIGKILLed mid-epoch (it kills itself at
    step 11, after its last checkpoint at step 8). Resumed from that checkpoint, the IDs
    yielded afterwards plus the IDs in the checkpoint's set are the dataset, none twice."""
    out = str(tmp_path)
    r = _run_script("train", out, "--kill-at", "11", "--ckpt-every", "4")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = _run_script("resume", out)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = pickle.load(open(os.path.join(out, "ckpt.pkl"), "rb"))
    in_ckpt = ConsumedSet.decode(ckpt["loader"]["consumed"]).sorted_keys().astype(np.int64)
    after = np.load(os.path.join(out, "after.npy"))
    assert len(in_ckpt) == 8 * 32
    both = np.concatenate([in_ckpt, after])
    assert len(both) == len(np.unique(both)) == 2000


@pytestmark_ray
def test_string_id_column_resumes_exactly_through_ray():
    """A string ``id_column`` (keys are hashes, scattered over 2^64: the consumed set is
    not cut into pieces and the cluster-side filter gets it as one chunk), stopped
    mid-epoch twice: every row exactly once across the three runs."""
    import ray

    def with_uid(batch):
        batch["uid"] = np.array([f"row-{i:05d}" for i in batch["id"]], dtype=object)
        return batch

    ds = ray.data.range(900, override_num_blocks=6).map_batches(with_uid, batch_format="numpy")

    def loader():
        return trd.RayIterableDataset(
            ds, batch_size=40, id_column="uid", shuffle_buffer_size=200,
            shuffle_seed=3,
        )

    first, sd = _take(loader(), 6)
    assert sd["exact"] and sd["consumed"]["count"] == 240
    assert sd["fingerprint"]["id_column"] == "uid"
    second_loader = loader()
    second_loader.load_state_dict(pickle.loads(pickle.dumps(sd)))  # as a checkpoint holds it
    second, sd2 = _take(second_loader, 4)
    assert sd2["consumed"]["count"] == 240 + 160
    third_loader = loader()
    third_loader.load_state_dict(pickle.loads(pickle.dumps(sd2)))
    third = [b["id"].numpy() for b in third_loader]
    ids = np.concatenate(first + second + third)
    assert np.sort(ids).tolist() == list(range(900))
