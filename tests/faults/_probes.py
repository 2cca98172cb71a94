"""Measurements the fault tests assert on: our threads, Ray actors, object-store use.

Not a test module. Object-store bytes: in Ray 2.60 ``ray._private.internal_api.
memory_summary`` needs ``grpcio`` (not a dependency here) and ``ray.util.state`` needs the
dashboard, so two measures that work on a bare ``ray.init(include_dashboard=False)``:

* ``plasma_used()``: the cluster's object-store bytes in use, ``cluster_resources() -
  available_resources()`` of ``object_store_memory`` (the raylets report usage there; it
  lags by up to a report period, hence :func:`settle`);
* ``driver_refs()``: object references this process holds (the core worker's reference
  table: a leaked block reference shows up here at once, whatever its size), with their
  bytes from ``get_local_object_locations``.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "trd_threads",
    "join_trd_threads",
    "plasma_used",
    "driver_refs",
    "alive_actors",
    "settle",
    "Snapshot",
]


def trd_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("trd-") and t.is_alive()]


def join_trd_threads(within: float = 1.0) -> list[str]:
    """Join every torch_raydata thread, all within ``within`` seconds; the names of those
    still alive after it (so ``== []`` asserts a clean stop, without a sleep)."""
    deadline = time.monotonic() + within
    for t in trd_threads():
        t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in trd_threads()]


def plasma_used() -> int:
    import ray

    total = ray.cluster_resources().get("object_store_memory", 0.0)
    avail = ray.available_resources().get("object_store_memory", 0.0)
    return int(total - avail)


def driver_refs() -> tuple[int, int]:
    """(object references held by this process, their bytes where known)."""
    import ray

    cw = ray._private.worker.global_worker.core_worker
    ids = list(cw.get_all_reference_counts())
    refs = [ray.ObjectRef(bytes.fromhex(i.decode() if isinstance(i, bytes) else i)) for i in ids]
    locs = cw.get_local_object_locations(refs) if refs else {}
    nbytes = sum(int((v or {}).get("object_size") or 0) for v in locs.values())
    del refs
    return len(ids), nbytes


# Ray Data's per-job singletons, created on first use and kept for the job by design.
RAY_SINGLETONS = frozenset({"_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker"})


def alive_actors() -> set[str]:
    """IDs of the cluster's ALIVE actors (GCS actor table; no dashboard needed), except
    Ray Data's per-job singletons."""
    import ray

    table = ray._private.state.state.actor_table(None)
    return {
        aid
        for aid, a in table.items()
        if a.get("State") == "ALIVE" and a.get("ActorClassName") not in RAY_SINGLETONS
    }


def settle(measure: Callable[[], float], ok: Callable[[float], bool], within: float) -> float:
    """``measure()`` until ``ok(value)`` or ``within`` seconds pass; the last value.

    For values Ray updates asynchronously (a raylet's usage report, an actor's death): a
    deadline on an external report, not a sleep standing in for a join.
    """
    deadline = time.monotonic() + within
    while True:
        gc.collect()
        value = measure()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


class Snapshot:
    """Baseline of threads, actors, driver references and plasma bytes; :meth:`check`
    asserts all are back to it (plasma within ``tol_bytes``)."""

    def __init__(self) -> None:
        gc.collect()
        self.threads = {t.ident for t in threading.enumerate()}
        self.actors = alive_actors()
        self.refs, self.ref_bytes = driver_refs()
        self.plasma = plasma_used()

    def check(
        self, *, tol_bytes: int = 1 << 20, within: float = 15.0, dataset: Any = None
    ) -> dict[str, int]:
        """``dataset``: its prestarted next epoch, the one thing allowed to outlive the
        stopped epoch (owned by the dataset, counted in its stats), is torn down first,
        as ``close()`` would; everything must then be back to the baseline."""
        if dataset is not None:
            dataset._next.discard()
        leaked_threads = join_trd_threads(1.0)
        refs = settle(lambda: driver_refs()[0], lambda v: v <= self.refs, within)
        actors = settle(lambda: len(alive_actors() - self.actors), lambda v: v == 0, within)
        plasma = settle(plasma_used, lambda v: v <= self.plasma + tol_bytes, within)
        report = {
            "refs_before": self.refs,
            "refs_after": int(refs),
            "new_actors_alive": int(actors),
            "plasma_before": self.plasma,
            "plasma_after": int(plasma),
        }
        assert leaked_threads == [], f"torch_raydata threads still alive: {leaked_threads}"
        assert refs <= self.refs, f"object references leaked: {report}"
        assert actors == 0, f"actors left alive: {report} {actor_classes(alive_actors() - self.actors)}"
        assert plasma <= self.plasma + tol_bytes, f"object-store bytes not back: {report}"
        return report


def actor_classes(ids: set[str]) -> list[str]:
    import ray

    table = ray._private.state.state.actor_table(None)
    return sorted(table[i].get("ActorClassName", "?") for i in ids if i in table)
