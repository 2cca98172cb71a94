"""The edges a new user hits first: wrapping the dataset in a DataLoader, a second
``iter()`` while an epoch runs, peeking, and states that cannot resume exactly.

Each test uses torch's real ``DataLoader`` where the user would, on the session's Ray.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import torch_raydata as trd

pytestmark = pytest.mark.usefixtures("ray_session")


def _ds(n=200, **kw):
    import ray

    kw.setdefault("batch_size", 20)
    return trd.RayIterableDataset(ray.data.range(n, override_num_blocks=1), **kw)


def _ids(batches):
    return [b["id"].tolist() for b in batches]


# -- DataLoader ---------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 4], ids=["default", "four"])
def test_a_dataloader_that_batches_again_is_refused(batch_size):
    ds = _ds()
    loader = DataLoader(ds) if batch_size == 1 else DataLoader(ds, batch_size=batch_size)
    with pytest.raises(ValueError, match=r"use ds.loader\(\), or DataLoader\(ds, batch_size=None\)"):
        next(iter(loader))
    ds.close()


def test_loader_is_configured_and_refuses_what_the_dataset_does():
    ds = _ds(100)
    loader = ds.loader()
    assert isinstance(loader, DataLoader) and loader.batch_size is None
    got = list(loader)
    assert [b["id"].shape for b in got] == [torch.Size([20])] * 5  # no leading dim of 1
    assert sorted(torch.cat([b["id"] for b in got]).tolist()) == list(range(100))
    assert list(DataLoader(ds, batch_size=None))[0]["id"].shape == (20,)  # still fine
    for bad in ({"batch_size": 4}, {"shuffle": True}, {"num_workers": 2}, {"drop_last": True}):
        with pytest.raises(ValueError, match="the dataset does this itself"):
            ds.loader(**bad)
    assert ds.loader(batch_size=None, num_workers=0, shuffle=False).batch_size is None
    ds.close()


# -- a second iter() while an epoch runs ---------------------------------------------------------
def test_nested_iteration_raises_instead_of_ending_the_outer_epoch():
    ds = _ds(200)
    loader = ds.loader()
    outer = []
    with pytest.raises(RuntimeError, match=r"iter\(\) was called again"):
        for i, batch in enumerate(loader):
            outer.append(batch)
            if i == 2:
                inner = list(loader)  # a quick eval over the same dataset
    assert len(outer) == 3 and sum(len(b["id"]) for b in inner) == 200
    ds.close()


def test_an_abandoned_iterator_never_used_again_is_no_error():
    ds = _ds(200)
    stale = iter(ds)
    next(stale), next(stale)  # e.g. a framework keeps its last epoch's iterator around
    assert sum(len(b) for b in _ids(ds)) == 200
    with pytest.raises(RuntimeError, match="epoch 0 was stopped after 2 batches"):
        next(stale)  # ... and only using it again is an error
    ds.close()


# -- peeks -------------------------------------------------------------------------------------
def test_a_peek_uses_up_no_epoch_and_changes_no_shuffle():
    kw = {"shuffle_buffer_size": 64, "shuffle_seed": 3, "preserve_order": True}
    plain = _ds(**kw)
    expected = [_ids(plain) for _ in range(2)]
    plain.close()
    ds = _ds(**kw)
    peeked = next(iter(ds.loader()))["id"].tolist()
    assert ds.state_dict()["epoch"] == 0 and ds.state_dict()["batches_consumed"] == 0
    it = iter(ds)
    first = next(it)["id"].tolist()
    it.close()  # a loop that breaks at its first batch is a peek too
    got = [_ids(ds) for _ in range(2)]
    assert got == expected  # epochs 0 and 1, in the same orders as without the peeks
    assert peeked == first == expected[0][0]
    assert ds.stats().epoch == 1
    ds.close()


def test_a_break_after_two_batches_uses_up_the_epoch():
    ds = _ds(shuffle_buffer_size=64, shuffle_seed=3)
    for i, _batch in enumerate(ds):
        if i == 1:
            break
    assert ds.state_dict()["epoch"] == 0 and ds.state_dict()["batches_consumed"] == 2
    _ids(ds)
    assert ds.stats().epoch == 1
    ds.close()


def test_a_peek_after_a_skip_ahead_resume_keeps_the_skip():
    ds = _ds(preserve_order=True)
    it = iter(ds)
    next(it), next(it), next(it)
    state = ds.state_dict()
    it.close()
    fresh = _ds(preserve_order=True)
    fresh.load_state_dict(state)
    next(iter(fresh))  # a peek at the resumed epoch...
    assert fresh.state_dict()["batches_consumed"] == 3
    ids = [i for b in _ids(fresh) for i in b]
    assert ids == list(range(60, 200))  # ... which still skips what was consumed
    ds.close()
    fresh.close()


# -- states that cannot resume exactly -----------------------------------------------------------
def _state_after(ds, batches):
    it = iter(ds)
    for _ in range(batches):
        next(it)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = ds.state_dict()
    it.close()
    return state, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_unseeded_shuffle_state_says_so_and_is_refused_unless_not_strict():
    ds = _ds(shuffle_buffer_size=64)
    state, warned = _state_after(ds, 3)
    assert state["reproducible"] is False and state["exact"] is False
    assert len(warned) == 1 and "cannot resume exactly" in str(warned[0].message)
    fresh = _ds(shuffle_buffer_size=64)
    with pytest.raises(ValueError, match="strict=False"):
        fresh.load_state_dict(state)
    fresh.load_state_dict(state, strict=False)  # accepted as a best-effort skip-ahead
    assert sum(len(b) for b in _ids(fresh)) == 200 - 3 * 20
    ds.close()
    fresh.close()


@pytest.mark.parametrize(
    "kw",
    [
        {"shuffle_buffer_size": 64, "shuffle_seed": 0},
        {"shuffle_buffer_size": 64, "id_column": "id"},
        {},
    ],
    ids=["seeded", "id_column", "no-shuffle"],
)
def test_states_that_can_resume_carry_no_warning(kw):
    ds = _ds(**kw)
    state, warned = _state_after(ds, 3)
    assert state["reproducible"] is True and not warned
    fresh = _ds(**kw)
    fresh.load_state_dict(state)
    ds.close()
    fresh.close()


def test_unseeded_shuffle_between_epochs_is_reproducible():
    ds = _ds(shuffle_buffer_size=64)
    _ids(ds)
    state = ds.state_dict()
    assert state["reproducible"] is True and state["batches_consumed"] == 0
    ds.close()


# -- options --------------------------------------------------------------------------------------
def test_spill_dir_is_an_argument_and_not_writable(tmp_path):
    ds = _ds(spill_dir=str(tmp_path))
    assert ds.spill_dir == str(tmp_path)
    with pytest.raises(AttributeError):
        ds.spill_dir = "elsewhere"
    with pytest.raises(ValueError, match="spill_dir=3"):
        _ds(spill_dir=3)
    ds.close()


def test_dir_lists_the_api():
    names = dir(trd)
    for name in ("RayDataModule", "RayIterableDataset", "iter_torch_batches", "TorchBatches"):
        assert name in names
    assert "RayDataModule" not in trd.__all__  # `import *` must work without Lightning
