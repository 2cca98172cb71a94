"""The shared-memory collate probe (``benchmarks/shm_probe.py``) gives right batches.

It is a measurement, not product code, but its figures only mean something if its
batches are the dataset's rows, once each, owning their slot until released; and a step
that misbehaves must get an error, not a deadlock. Runs on the session's local Ray.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

shm_probe = pytest.importorskip("benchmarks.shm_probe")

ROWS, BATCH = 1000, 64


@pytest.fixture
def materialized(ray_session):
    import ray.data

    def add_image(b):
        ids = b["id"]
        image = (ids[:, None, None] + np.arange(12).reshape(1, 3, 4)) % 251
        return {"id": ids, "image": image.astype(np.uint8)}

    return ray.data.range(ROWS, override_num_blocks=5).map_batches(add_image).materialize()


@pytest.fixture
def loader(materialized):
    made = []

    def make(**options):
        made.append(shm_probe.ShmCollateLoader(materialized, BATCH, **options))
        return made[-1]

    yield make
    for one in made:
        one.close()


def _expected_image(ids: np.ndarray) -> np.ndarray:
    return ((ids[:, None, None] + np.arange(12).reshape(1, 3, 4)) % 251).astype(np.uint8)


def test_every_row_comes_once_in_order_with_its_own_values(loader, materialized):
    # The dataset's order is its blocks' order, which materialize() need not make sorted.
    order = np.concatenate([b["id"] for b in materialized.iter_batches(batch_size=None)])
    assert sorted(order) == list(range(ROWS))
    probe = loader(workers=2, slots_per_worker=2, slot_bytes=1 << 16)
    for _ in range(2):  # the ring and the actors are reused by the next epoch
        seen = []
        for batch in probe.epoch():
            ids = batch["id"].numpy()
            np.testing.assert_array_equal(batch["image"].numpy(), _expected_image(ids))
            seen.append(ids.copy())
        np.testing.assert_array_equal(np.concatenate(seen), order)
        assert [n for n, _ in probe.cpu] == [8, 8]  # 16 batches, round-robin


def test_a_held_batch_keeps_its_slot_until_released(loader):
    probe = loader(workers=1, slots_per_worker=2, slot_bytes=1 << 16)
    it = probe.epoch()
    first = next(it)
    kept = first["image"].clone()
    for _ in range(5):  # every later slot comes back: only `first` is held
        batch = next(it)
        del batch
    assert probe._held == [1]
    assert np.array_equal(first["image"].numpy(), kept.numpy())  # not overwritten
    del first
    gc.collect()
    assert probe._held == [0]
    it.close()


def test_holding_every_slot_is_an_error_not_a_deadlock(loader):
    probe = loader(workers=1, slots_per_worker=2, slot_bytes=1 << 16)
    it = probe.epoch()
    held = [next(it), next(it)]
    with pytest.raises(RuntimeError, match="holds all 2 ring slots.*slots_per_worker"):
        next(it)
    assert len(held) == 2


def test_an_actor_failure_reaches_the_consumer_with_its_message(loader):
    probe = loader(workers=2, slots_per_worker=2, slot_bytes=1 << 16)
    with pytest.raises(ValueError, match="injected failure at batch 3"):
        for _ in probe.epoch(fail_at=3):
            pass


def test_close_kills_the_actors(loader, ray_session):
    probe = loader(workers=2, slots_per_worker=2, slot_bytes=1 << 16)
    actors = list(probe.actors)
    probe.close()
    for actor in actors:
        with pytest.raises(ray_session.exceptions.RayActorError):
            ray_session.get(actor.__ray_ready__.remote(), timeout=30)


def test_a_batch_held_across_epochs_keeps_its_slot(loader):
    # Slot state outlives an epoch: the next epoch must not reuse the held batch's slot,
    # and returns left in the socket at an epoch's end are not read as extra free slots.
    probe = loader(workers=1, slots_per_worker=3, slot_bytes=1 << 16)
    kept_batch = None
    for epoch in range(4):
        for i, batch in enumerate(probe.epoch()):
            if epoch == 0 and i == len(range(0, ROWS, BATCH)) - 2:
                kept_batch, kept = batch, batch["image"].clone()
            ids = batch["id"].numpy()
            np.testing.assert_array_equal(batch["image"].numpy(), _expected_image(ids))
        del batch, ids  # `ids` is a view: it holds the slot as much as the batch does
    assert kept_batch is not None
    assert np.array_equal(kept_batch["image"].numpy(), kept.numpy())
    assert probe._held == [1]
