"""The collate actors of one remote-collate transport (NIXL or shm), kept across epochs.

Owns: starting a set of ``num_actors`` collate actors (``worker.py``) when an epoch first
needs them, lending the set to one epoch at a time, keeping it between epochs, and
killing actors: a set whose epoch failed, every set when the transport closes, and every
set when the transport is garbage-collected (``weakref.finalize``: no actor outlives its
transport, so none outlives the dataset that owns it). Does not own the NIXL connections
to the actors' agents: the transport forgets the agents of the actors killed here.

A set is tied to what was pickled into its actors: the collate_fn (by identity), the
id_column and the bound on busy slabs. An epoch asking for the same gets the idle set
(the next epoch of the same dataset); otherwise a new set starts. At most ``MAX_IDLE``
sets wait between epochs (e.g. the train and val datasets of a DataModule sharing one
transport instance); beyond that the longest idle is killed.

Starting an actor costs seconds (a fresh process importing torch, a NIXL agent, UCX
wire-up): 4-19 s per epoch when every epoch started its own.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["ActorCollate", "CollateActors", "MAX_IDLE", "start_actors"]

MAX_IDLE = 2

Workers = list[tuple[Any, str]]  # (actor handle, NIXL agent name) pairs


@dataclass(eq=False)
class _Set:
    collate_fn: Any
    id_column: str | None
    max_slabs: int
    workers: Workers

    def fits(self, collate_fn: Any, id_column: str | None, max_slabs: int) -> bool:
        return (
            self.collate_fn is collate_fn
            and self.id_column == id_column
            and self.max_slabs == max_slabs
        )


def _kill(handles: list[Any]) -> None:
    """``ray.kill`` each actor; already dead, or Ray already shut down, is fine."""
    if not handles:
        return
    try:
        import ray

        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - dead already, or no Ray any more
                pass
    except Exception:  # noqa: BLE001 - runs from a finalizer: never raise
        pass


def _kill_live(live: dict[str, Any]) -> None:
    """The finalizer: kill every actor still alive (``live`` is shared with the owner)."""
    handles = list(live.values())
    live.clear()
    _kill(handles)


class CollateActors:
    """Sets of collate actors for one transport (``owner``: its ``num_actors``,
    ``actor_num_cpus`` and ``worker_spec()`` say how to start them); see the module
    docstring. Holds the owner weakly: its garbage
    collection kills every actor started here."""

    def __init__(self, owner: Any) -> None:
        self._owner = weakref.ref(owner)
        self._lock = threading.Lock()
        self._idle: list[_Set] = []
        self._lent: dict[int, _Set] = {}  # id(workers list) -> set, while an epoch has it
        self._live: dict[str, Any] = {}  # agent name -> handle, every actor not killed
        weakref.finalize(owner, _kill_live, self._live)

    @property
    def live(self) -> int:
        """Actors started and not killed (idle or lent to an epoch)."""
        return len(self._live)

    def acquire(self, collate_fn: Any, *, id_column: str | None, max_slabs: int) -> Workers:
        """The idle set that fits, or a new one; lent until :meth:`release`."""
        with self._lock:
            found = next((s for s in self._idle if s.fits(collate_fn, id_column, max_slabs)), None)
            if found is not None:
                self._idle.remove(found)
        if found is None:
            owner = self._owner()
            assert owner is not None, "acquire() is called through the transport"
            workers = start_actors(owner, collate_fn, id_column=id_column, max_slabs=max_slabs)
            found = _Set(collate_fn, id_column, max_slabs, workers)
        with self._lock:
            self._live.update((name, handle) for handle, name in found.workers)
            self._lent[id(found.workers)] = found
        return found.workers

    def release(self, workers: Workers, *, reusable: bool) -> list[str]:
        """An epoch hands its set back: kept idle when ``reusable``, else killed. Returns
        the agent names of the actors killed (to forget)."""
        with self._lock:
            lent = self._lent.pop(id(workers), None)
            doomed: list[_Set] = []
            if lent is None:  # not ours (or the transport closed meanwhile): kill them
                doomed.append(_Set(None, None, 0, list(workers)))
            elif reusable:
                self._idle.append(lent)
                while len(self._idle) > MAX_IDLE:
                    doomed.append(self._idle.pop(0))
            else:
                doomed.append(lent)
            return self._kill_sets(doomed)

    def close(self) -> list[str]:
        """Kill every actor, idle or lent; returns their agent names."""
        with self._lock:
            doomed = self._idle + list(self._lent.values())
            self._idle.clear()
            self._lent.clear()
            return self._kill_sets(doomed)

    def _kill_sets(self, sets: list[_Set]) -> list[str]:  # lock held
        names = [name for s in sets for _, name in s.workers]
        for name in names:
            self._live.pop(name, None)
        _kill([handle for s in sets for handle, _ in s.workers])
        return names


class ActorCollate:
    """The ``RemoteCollate`` members a transport with collate actors shares (NIXL, shm):
    its :class:`CollateActors` is ``self._actors``; it provides ``worker_spec()`` (how to
    start one) and ``forget(names)`` (drop what it holds for actors that are gone)."""

    _actors: CollateActors
    name: str  # the transport= name, for messages
    descriptor: type  # what its actors return for a batch

    def fetch(self, batch: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} hands out batches collated by its actors "
            f"({self.descriptor.__name__} descriptors), got {type(batch).__name__}; use it "
            f"through RayIterableDataset(transport={self.name!r}), which runs the remote epoch"
        )

    def check_descriptors(self, batches: list[Any]) -> None:
        """A TypeError (:meth:`fetch`'s) for anything that is not a descriptor."""
        for b in batches:
            if not isinstance(b, self.descriptor):
                self.fetch(b)

    def epoch_class(self) -> Any:
        """The remote epoch (``epoch.py``): the dataset runs it instead of the local stages."""
        from .epoch import RemoteEpochRun

        return RemoteEpochRun

    def acquire_workers(
        self, collate_fn: Any, *, id_column: str | None, max_slabs: int
    ) -> list[tuple[Any, str]]:
        """``num_actors`` collate actors for one epoch, ``(handle, name)`` pairs: started
        by the first epoch, the same ones for the next epochs."""
        return self._actors.acquire(collate_fn, id_column=id_column, max_slabs=max_slabs)

    def release_workers(self, workers: list[tuple[Any, str]], *, reusable: bool) -> None:
        """The epoch is over: keep its actors for the next one, or (``reusable=False``: one
        failed) kill them and forget them."""
        self.forget(self._actors.release(workers, reusable=reusable))

    @property
    def live_actors(self) -> int:
        """Collate actors alive (idle between epochs, or working for one)."""
        return self._actors.live

    def forget(self, names: list[str]) -> None:
        raise NotImplementedError


def start_actors(owner: Any, collate_fn: Any, *, id_column: str | None, max_slabs: int) -> Workers:
    """Start ``owner.num_actors`` collate actors; ``(handle, name)`` pairs. ``owner`` says
    how: ``worker_spec()`` -> (actor class, its keyword arguments, ``.options``), and
    ``name`` for messages. A collate_fn that cannot be pickled is a TypeError saying so
    (it runs in the actors)."""
    import ray

    worker_class, kwargs, options = owner.worker_spec()
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cls = ray.remote(worker_class)
    options = {"num_cpus": owner.actor_num_cpus, "max_restarts": 0} | options
    out: Workers = []
    try:
        for i in range(owner.num_actors):
            name = f"trd-collate-{tag}-{i}"
            handle = cls.options(**options).remote(
                name, collate_fn, id_column=id_column, max_slabs=max_slabs, **kwargs
            )
            out.append((handle, name))
    except BaseException as e:
        _kill([handle for handle, _ in out])
        if isinstance(e, TypeError) and "serialize" in str(e):
            raise TypeError(
                f"collate_fn={collate_fn!r} must be picklable: with transport="
                f"{owner.name!r} it runs in Ray actors ({str(e).splitlines()[0]})"
            ) from e
        raise
    return out
