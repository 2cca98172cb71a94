"""Distributed training: one Ray cluster per run, one shard per rank, equal steps per rank.

Owns, for torch.distributed runs (torchrun, Lightning ``strategy="ddp"``) where every rank
runs the same script:

* :func:`init_ray` — attach every rank to the same Ray cluster (``RAY_ADDRESS`` when set;
  otherwise rank 0 starts a local one and shares its address over torch.distributed).
* :func:`shard` — split a Dataset once per run with ``streaming_split(world, equal=True)``
  and hand each rank its shard through a named Ray actor (created by rank 0, which owns
  the split; looked up by name by the other ranks; gone once every rank released it).
* :class:`RankSource` — stage 1 as one rank sees it. ``RayIterableDataset`` uses it, so a
  ``ray.data.Dataset`` given to it on every rank is sharded at the first epoch.

Equal steps. Every rank must run the same number of training steps, or DDP hangs in its
next all-reduce. Policy: drop. ``streaming_split(equal=True)`` gives every rank exactly
``floor(N / world)`` rows (it leaves ``N % world`` rows out; rank 0 counts them in
``stats().rows_dropped`` with a note, and logs it once). Stage 3 turns ``R`` rows into
exactly ``ceil(R / batch_size)`` batches (``floor`` with ``drop_last``) whatever the block
boundaries and the local shuffle — unlike Ray's own ``iter_batches`` (Ray #66085) — so
equal rows are equal steps. When ``N`` is known (or given as ``num_rows``) that count is
also enforced as ``max_batches``: a rank with more batches drops and counts the rest; a
rank with fewer raises instead of hanging its peers.

Does not own Ray Train: there the trainer splits the datasets itself; pass
``ray.train.get_dataset_shard("train")`` (a DataIterator, used as is). A DataIterator is
never re-split, which is also how one rank can read a whole dataset: ``ds.iterator()``.

Public Ray APIs only; the split itself (an ordered copy for ``preserve_order``) is in
``pipeline/source.py``.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .pipeline.source import EpochBlocks, RaySource, split_for_ranks
from .pipeline.stats import StatsRecorder
from .resume.merge import merge_states

__all__ = ["init_ray", "world", "shard", "gather_state_dict", "RankShard", "RankSource", "NAMESPACE"]

logger = logging.getLogger(__name__)

#: Ray namespace of the shard hand-out actors (ranks are separate Ray jobs, each in its
#: own anonymous namespace unless told otherwise).
NAMESPACE = "torch_raydata"

# ray.init arguments that are valid when connecting to an existing cluster; the rest
# (num_cpus, include_dashboard, ...) only apply when starting one.
_CONNECT_KEYS = ("namespace", "runtime_env", "log_to_driver", "logging_level", "logging_format")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default torch.distributed group; ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


#: A rank that waits longer than this many seconds for the others at one of the
#: collectives here logs one line naming itself and the place (a straggler shows as the
#: rank that did NOT log). Env ``TORCH_RAYDATA_STRAGGLER_SECONDS`` overrides the default.
STRAGGLER_SECONDS = float(os.environ.get("TORCH_RAYDATA_STRAGGLER_SECONDS", "5"))


def _collective(where: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a collective; logs when this rank waited > STRAGGLER_SECONDS."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    waited = time.perf_counter() - t0
    if waited > STRAGGLER_SECONDS:
        logger.warning(
            "torch_raydata: rank %d waited %.1f s for the other ranks at %s",
            world()[0], waited, where,
        )
    return out


def _broadcast(obj: Any, where: str = "a broadcast from rank 0") -> Any:
    """``obj`` from rank 0, on every rank (collective: every rank must call it)."""
    box = [obj]
    _collective(where, torch.distributed.broadcast_object_list, box, src=0)
    return box[0]


def gather_state_dict(state: dict[str, Any], *, spill_dir: str | None = None) -> dict[str, Any]:
    """Every rank's ``RayIterableDataset.state_dict()`` merged into one (collective).

    Call it on every rank at the same training step; every rank gets the same merged
    state, whose consumed-ID set is the union of the ranks' sets. Load it into every rank
    of the resumed run (any world size: the rest of the epoch is split afresh among the
    ranks). Single-process: returns ``state`` as is.

        state = trd.distributed.gather_state_dict(ds.state_dict())
        if dist.get_rank() == 0:
            torch.save({"model": ..., "loader": state}, path)
    """
    if world()[1] == 1:
        return state
    states: list[Any] = [None] * world()[1]
    _collective(
        "gather_state_dict() (every rank saves loader state)",
        torch.distributed.all_gather_object, states, state,
    )
    return merge_states(states, spill_dir=spill_dir)


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def _env_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` from a launcher's environment (torchrun, Lightning), if any."""
    size = os.environ.get("WORLD_SIZE")
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK"))
    if size is None or rank is None:
        return None
    try:
        return int(rank), int(size)
    except ValueError:
        return None


def _check_same_cluster(expected: str, rank: int) -> None:
    mine = _gcs_address()
    if mine != expected:
        raise RuntimeError(
            f"rank {rank} is connected to the Ray cluster at {mine!r} but rank 0 uses "
            f"{expected!r}: every rank must use one cluster. Call "
            "torch_raydata.distributed.init_ray() on every rank before anything starts Ray "
            "(building a ray.data Dataset does), or set RAY_ADDRESS for every rank"
        )


def init_ray(*, num_cpus: int | None = None, export_address: bool = True, **ray_init_kwargs: Any) -> str:
    """Attach this process to the run's Ray cluster; return the cluster's GCS address.

    * Already connected: kept (under torch.distributed, checked to be rank 0's cluster).
    * ``RAY_ADDRESS`` set: ``ray.init(address=RAY_ADDRESS)``.
    * Under torch.distributed with more than one rank: collective, call it on every rank.
      Rank 0 starts a local Ray (``ray.init(num_cpus=num_cpus, **ray_init_kwargs)``) and
      broadcasts its address; the other ranks connect to it.
    * Otherwise: start a local Ray. With ``export_address`` (default) its address is put
      in ``os.environ["RAY_ADDRESS"]``, so processes this one starts later join the same
      cluster — Lightning's DDP launcher re-runs the script once per rank.

    Args:
        num_cpus: CPUs of a Ray started here (None: all of the machine's).
        export_address: export ``RAY_ADDRESS`` after starting a local Ray (single process).
        ray_init_kwargs: more ``ray.init`` arguments; when connecting to a running cluster
            only ``namespace``, ``runtime_env`` and the logging ones are passed on.

    Returns:
        The GCS address (``"ip:port"``), the value ``RAY_ADDRESS`` takes.

    Example:
        >>> torch.distributed.init_process_group("gloo")   # torchrun: first
        >>> trd.distributed.init_ray(num_cpus=4)            # then Ray, on every rank
        >>> ds = ray.data.read_parquet(path)                # then datasets
    """
    import ray

    connect = {k: v for k, v in ray_init_kwargs.items() if k in _CONNECT_KEYS}
    rank, size = world()
    if size > 1:
        address = None
        if rank == 0:
            if not ray.is_initialized():
                if os.environ.get("RAY_ADDRESS"):
                    ray.init(address=os.environ["RAY_ADDRESS"], **connect)
                else:
                    ray.init(num_cpus=num_cpus, **ray_init_kwargs)
            address = _gcs_address()
        address = _broadcast(address, "init_ray() (rank 0 shares the Ray address)")
        if rank != 0:
            if ray.is_initialized():
                _check_same_cluster(address, rank)
            else:
                ray.init(address=address, **connect)
        return address
    if ray.is_initialized():
        return _gcs_address()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **connect)
        return _gcs_address()
    env = _env_world()
    if env is not None and env[1] > 1:
        raise RuntimeError(
            f"init_ray() on rank {env[0]} of {env[1]} (WORLD_SIZE is set) before "
            "torch.distributed.init_process_group() and without RAY_ADDRESS: the ranks cannot "
            "agree on one Ray cluster yet. Call init_process_group() first (torchrun), call "
            "init_ray() in the launching process before trainer.fit() (Lightning DDP), or "
            "set RAY_ADDRESS"
        )
    ray.init(num_cpus=num_cpus, **ray_init_kwargs)
    address = _gcs_address()
    if export_address:
        os.environ["RAY_ADDRESS"] = address
    return address


@dataclass(frozen=True)
class RankShard:
    """This rank's part of a dataset split across the ranks of one run.

    ``rows_per_rank`` is ``floor(total_rows / world_size)`` (what ``equal=True`` gives
    every rank) and ``rows_left_out`` the ``total_rows % world_size`` rows no rank gets;
    both None when the dataset's row count is not known without executing it.
    """

    iterator: Any  # ray.data.DataIterator
    rank: int
    world_size: int
    total_rows: int | None
    rows_per_rank: int | None
    rows_left_out: int | None
    name: str


# Rank 0 keeps a handle on every hand-out actor it created, so the actor (and the split it
# owns) outlives rank 0's own dataset: a faster rank 0 may drop its dataset while a slower
# rank still reads its shard. The actor leaves when every rank has released it (or with
# rank 0's process, which owns it).
_HOLDERS: dict[str, Any] = {}


def _shard_holder_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class ShardHolder:
        """Splits one dataset for the ranks and owns the split until every rank is done.

        The split (``streaming_split``'s coordinator actor) is created here, so this actor
        owns it: no rank's process owns another rank's shard, and Ray's reference counting
        never has to follow a handle from rank 0 through a third process to rank 1.
        """

        def __init__(self, dataset: Any, n: int, preserve_order: bool) -> None:
            self.shards = split_for_ranks(dataset, n, preserve_order=preserve_order)
            self.released: set[int] = set()

        def ready(self) -> bool:
            return True

        def get(self, rank: int) -> Any:
            return self.shards[rank]

        def release(self, rank: int) -> None:
            """Rank ``rank`` no longer reads its shard; the last release ends the actor."""
            self.released.add(rank)
            if len(self.released) == len(self.shards):
                self.shards = []
                ray.actor.exit_actor()

    return ShardHolder


def _release(holder: Any, rank: int) -> None:
    """Tell the hand-out actor this rank is done (fire and forget: runs during GC)."""
    import ray

    if ray.is_initialized():
        try:
            holder.release.remote(rank)
        except Exception:  # noqa: BLE001 - the actor or Ray may already be gone
            pass


def shard(dataset: Any, *, preserve_order: bool = False, num_rows: int | None = None) -> RankShard:
    """Split ``dataset`` across the ranks once; return this rank's shard.

    Collective: call it on every rank, in the same order as the other collectives. Only
    rank 0's ``dataset`` is split (the other ranks' may be None). Rank 0 creates
    a named Ray actor (namespace :data:`NAMESPACE`, a name unique to this call, broadcast
    to the ranks) that runs ``streaming_split(world_size, equal=True)`` and owns the
    split; every rank takes its own iterator from it by name. The actor lives until every
    rank's iterator has been garbage-collected (each sends a release) or rank 0 exits.

    Args:
        dataset: a ``ray.data.Dataset`` (rank 0).
        preserve_order: keep block order within each shard (split an ordered copy).
        num_rows: the dataset's rows per epoch if you know it and Ray does not (e.g. after
            a 1:1 ``map_batches``); None: ask the dataset.

    Returns:
        A :class:`RankShard`; its ``iterator`` is a ``DataIterator`` to pass to
        ``RayIterableDataset`` (one iteration per epoch; every rank must run each epoch).
    """
    import ray
    from ray.data import Dataset
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    rank, size = world()
    if rank == 0 and not isinstance(dataset, Dataset):
        raise TypeError(
            f"shard() needs a ray.data.Dataset on rank 0, got {type(dataset).__name__}; a "
            "DataIterator is already a shard: pass it to RayIterableDataset as is"
        )
    if size == 1:
        n = num_rows if num_rows is not None else RaySource(dataset).num_rows()
        return RankShard(dataset.iterator(), 0, 1, n, n, 0 if n is not None else None, "")
    info = None
    if rank == 0:
        n = num_rows if num_rows is not None else RaySource(dataset).num_rows()
        name = f"trd-shards-{uuid.uuid4().hex[:16]}"
        # On rank 0's node, where streaming_split would put its coordinator.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        holder = _shard_holder_class().options(
            name=name, namespace=NAMESPACE, scheduling_strategy=here
        ).remote(dataset, size, preserve_order)
        _HOLDERS[name] = holder
        ray.get(holder.ready.remote())  # split and registered before any rank looks it up
        info = {"name": name, "address": _gcs_address(), "total_rows": n}
    info = _broadcast(info, "shard() (rank 0 splits the dataset)")
    if rank == 0:
        holder = _HOLDERS[info["name"]]
    else:
        _check_same_cluster(info["address"], rank)
        holder = ray.get_actor(info["name"], namespace=NAMESPACE)
    iterator = ray.get(holder.get.remote(rank))
    weakref.finalize(iterator, _release, holder, rank).atexit = False
    n = info["total_rows"]
    if n is None:
        return RankShard(iterator, rank, size, None, None, None, info["name"])
    return RankShard(iterator, rank, size, n, n // size, n % size, info["name"])


class RankSource:
    """Stage 1 as one rank sees it: the whole input, or (under torch.distributed with a
    ``Dataset`` input) this rank's shard of it, split at the first epoch.

    Same interface as :class:`~torch_raydata.pipeline.source.RaySource` plus
    :meth:`max_batches`; ``open(stats)`` also records the rows the equal split leaves out.
    """

    def __init__(self, data: Any, *, preserve_order: bool = False, num_rows: int | None = None) -> None:
        self._base = RaySource(data, preserve_order=preserve_order)
        self._num_rows = num_rows
        self._shard: RankShard | None = None

    @property
    def data(self) -> Any:
        return self._base.data

    @property
    def preserve_order(self) -> bool:
        return self._base.preserve_order

    @property
    def is_shard(self) -> bool:
        return self._base.is_shard

    def ends_in_map(self) -> bool:
        return self._base.ends_in_map()

    @property
    def shard(self) -> RankShard | None:
        """This rank's shard once split (None single-process or before the first epoch)."""
        return self._shard

    def _world_size(self) -> int:
        if self._shard is not None:
            return self._shard.world_size
        return 1 if self._base.is_shard else world()[1]

    def total_rows(self) -> int | None:
        """Rows of the whole input per epoch, if known (``num_rows`` or the dataset's)."""
        return self._num_rows if self._num_rows is not None else self._base.num_rows()

    def num_rows(self) -> int | None:
        """Rows this rank gets per epoch, if known without executing the dataset."""
        if self._shard is not None:
            return self._shard.rows_per_rank
        n = self.total_rows()
        size = self._world_size()
        return n // size if n is not None and size > 1 else n

    def column_names(self) -> list[str] | None:
        return self._base.column_names()

    def max_batches(
        self, batch_size: int, drop_last: bool, total_rows: int | None = None
    ) -> int | None:
        """Batches every rank yields per epoch (the equal-steps cap), if known; None when
        not split across ranks or the row count is unknown. ``total_rows`` overrides the
        dataset's row count (a resumed epoch runs over fewer rows)."""
        if self._world_size() == 1:
            return None
        if total_rows is not None:
            rows: int | None = total_rows // self._world_size()
        else:
            rows = self.num_rows()
        if rows is None:
            return None
        return rows // batch_size if drop_last else math.ceil(rows / batch_size)

    def open(
        self,
        stats: StatsRecorder | None = None,
        transform: Any = None,
        total_rows: int | None = None,
    ) -> EpochBlocks:
        """Start one epoch of this rank's block stream (the first one splits, collectively).

        ``transform`` (``Dataset -> Dataset``, e.g. the resume filter) applies to this epoch
        only: under torch.distributed the transformed dataset gets a split of its own, made
        collectively for this epoch, so the remaining rows are divided afresh among the
        current ranks (the world size may differ from the run that saved the state).
        """
        if transform is not None:
            if self._world_size() == 1 or self._base.is_shard:
                return self._base.open(transform)
            s = shard(
                transform(self._base.data),
                preserve_order=self._base.preserve_order,
                num_rows=total_rows,
            )
            return RaySource(s.iterator).open()
        if self._shard is None and self._world_size() > 1:
            self._shard = shard(
                self._base.data, preserve_order=self._base.preserve_order, num_rows=self._num_rows
            )
            self._log_split()
        if self._shard is None:
            return self._base.open()
        s = self._shard
        if stats is not None and s.rank == 0 and s.rows_left_out:
            stats.add_dropped(
                s.rows_left_out,
                f"streaming_split({s.world_size}, equal=True): every rank gets "
                f"{s.rows_per_rank} rows, {s.rows_left_out} of {s.total_rows} go to none "
                "(counted on rank 0)",
            )
        return RaySource(s.iterator).open()

    def _log_split(self) -> None:
        s = self._shard
        assert s is not None
        if s.rank != 0:
            return
        if s.rows_left_out:
            logger.warning(
                "torch_raydata: %d ranks get %d rows each per epoch; %d of %d rows go to no rank "
                "(streaming_split(equal=True) keeps steps equal; counted in rank 0's "
                "stats().rows_dropped)",
                s.world_size, s.rows_per_rank, s.rows_left_out, s.total_rows,
            )
        elif s.total_rows is None:
            logger.info(
                "torch_raydata: split across %d ranks with equal=True; row count unknown "
                "until executed, so rows left out by the split (< %d) are not counted",
                s.world_size, s.world_size,
            )
