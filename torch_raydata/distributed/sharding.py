"""One shard per rank, equal steps per rank: splitting a Dataset across the ranks of a
torch.distributed run, and stage 1 as one rank sees it.

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
Does not own the cluster or the collectives (``cluster.py``); the split itself (an
ordered copy for ``preserve_order``) is in ``pipeline/source.py``.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from ..pipeline.batching import num_batches
from ..pipeline.source import EpochBlocks, RaySource, split_for_ranks
from ..pipeline.stats import StatsRecorder
from .cluster import broadcast, check_same_cluster, gcs_address, world

__all__ = ["NAMESPACE", "RankShard", "RankSource", "shard"]

logger = logging.getLogger(__name__)

#: Ray namespace of the shard hand-out actors (ranks are separate Ray jobs, each in its
#: own anonymous namespace unless told otherwise).
NAMESPACE = "torch_raydata"

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
        info = {"name": name, "address": gcs_address(), "total_rows": n}
    info = broadcast(info, "shard() (rank 0 splits the dataset)")
    if rank == 0:
        holder = _HOLDERS[info["name"]]
    else:
        check_same_cluster(info["address"], rank)
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
    def ray_source(self) -> RaySource:
        """The whole input's stage 1 (what one process opens; its file listing is made
        once and shared by every epoch opened through it)."""
        return self._base

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
        return num_batches(rows, batch_size, drop_last)

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
            # Only rank 0's dataset is split: the other ranks build no filter (nor put
            # the consumed set into the object store once more).
            s = shard(
                transform(self._base.data) if world()[0] == 0 else None,
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
