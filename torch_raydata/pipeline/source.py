"""Stage 1: source — a Ray Dataset or DataIterator -> this rank's block references.

THE one module that touches Ray internals, with its two parts ``source_listing.py`` (the
file listing) and ``source_executor.py`` (our hooks in each executor we start). What it relies on (pinned by
``tests/test_source_pins.py``, so a Ray upgrade fails loudly here and nowhere else):

* ``Dataset._create_executor()`` and ``Dataset._execute_dag(executor)``: start an epoch's
  streaming executor WITHOUT waiting for its first output (Ray's own
  ``_to_ref_bundle_iterator`` blocks until the first bundle exists, seconds for a
  ``read_parquet``): the open returns at once, the wait happens on the prefetch thread,
  and an epoch can be started ahead of time (``pipeline/prestart.py``).
* The executor's ``_backpressure_policies`` list (policies answer ``can_add_input(op)``
  and ``max_task_output_bytes_to_read(op)``), ``_consumer_idling``, ``_topology`` (ops
  with ``num_active_tasks()``), ``_output_node`` (its op's
  ``metrics.num_external_outqueue_bytes``: bytes waiting for us), ``_shutdown`` and
  ``shutdown(force)``, ``is_alive()`` (its scheduling thread), and ``_callbacks``
  (``ExecutionCallback.on_execution_step``, called at the end of each scheduling step).
  We add one policy of our own to each executor we start: it holds a prestarted epoch to
  a byte budget, and on an early stop it lets running tasks finish before the shutdown
  (see ``EpochBlocks.close``); and a step counter, so that the early stop knows when a
  step that passed the policy just before it closed has dispatched (``_quiesce``), and
  that pauses a step ending with no task running (``op.get_active_tasks()``; Ray's loop
  would spin, see ``_Hold.pace``).
* ``executor._resource_manager`` (built by ``_execute_dag``): its
  ``_get_total_resources`` (what the executor's limits are sized from: the autoscaling
  coordinator's reservation, empty at the executor's start) and
  ``_global_limits_last_update_time``; ``ExecutionResources.from_resource_dict`` and
  ``.max`` (``_size_to_cluster``).
* ``DataIterator._to_ref_bundle_iterator() -> (Iterator[RefBundle], stats, executor)``
  and ``DataIterator._on_iteration_end(executor)`` for inputs we do not copy (a
  ``streaming_split`` shard such as a Ray Train shard, a MaterializedDataset): the same
  pair Ray's own ``iter_batches`` uses.
* ``RefBundle.blocks`` entries with ``.ref`` and ``.metadata.{num_rows,size_bytes}``,
  and ``RefBundle.slices`` (``None`` or ``.start_offset``/``.end_offset`` per block).
* ``Dataset._meta_count()``: the row count when known without executing anything.
* ``ray.data.dataset.MaterializedDataset``: served from its cached bundle, no executor.
* ``Dataset._logical_plan.dag`` and ``AbstractMap`` (``ends_in_map``): whether an
  appended ``map_batches`` fuses into the last stage's task.
* File listing (``read_parquet`` and other file reads, Ray 2.60's datasource V2): the
  logical ``ListFiles`` operator (``dag.post_order_iter()``, ``shuffle_config_factory``),
  ``InputData(input_data=[RefBundle])``, ``LogicalPlan(dag, context)``,
  ``LogicalOperator._apply_transform``, ``Dataset(logical_plan, context, in_stats)``,
  ``RefBundle(blocks=(BlockEntry(ref, metadata),), schema, owns_blocks)`` and
  ``Dataset.iter_internal_ref_bundles()``: the listing runs once per source, and each
  epoch's copy reads from it (see ``RaySource._listed``). A listing of a few files is
  made in this process by Ray's own listing functions (``list_files_for_each_block``,
  ``partition_files``, ``FooterFileIndexer`` with ``_iter_file_infos_for_list``,
  ``_batches``, ``_coalesce_bytes``, ``FooterReader.read_footers`` and
  ``_file_chunks_to_manifest``, ``TaskContext``): see ``source_listing.py``; if any of
  them changes, Ray's listing runs instead and ``tests/test_prestart.py`` fails. The
  epoch's exact row count from that listing (``listed_rows``, for the prestart's lead):
  the manifest's ``FILE_CHUNK_METADATA_COLUMN_NAME`` (``num_rows``, ``fully_matched``),
  ``ReadFiles.scanner`` (``ParquetScanner``: ``predicate``, ``partition_predicate``,
  ``limit``) and ``block_udf``, ``ListFiles.{predicate,limit}``, ``AbstractOneToOne``'s
  ``can_modify_num_rows`` and ``per_block_limit``, and ``Dataset.add_column``'s batch
  function name (pinned in ``tests/test_source_pins.py``). The listing's units are split
  to ``ReadFiles.parallelism`` (``override_num_blocks``) or two per cluster CPU while a
  unit keeps 1 MiB of files (``FILE_SIZE_COLUMN_NAME``; ``source_listing.split_listing``,
  ``tests/test_read_units.py``): each manifest row is a file or a run of a file's row
  groups, read on its own.
* ``ray._private.state.jobs()`` (the GCS job table: one entry per driver, with
  ``JobID``, ``DriverPid``, ``IsDead``) and ``ray.get_runtime_context().get_job_id()``:
  which other drivers are still connected to a cluster this process started
  (:func:`other_live_drivers`, for ``distributed.init_ray``'s exit wait).
* ``ray.train.utils._in_ray_train_worker()``: whether this process is a Ray Train worker
  (``iter_torch_batches(device="auto")`` then uses ``ray.train.torch.get_device()``).
* ``AbstractMap.compute`` (an actor-pool map does not fuse an appended stage).
* ``Dataset.copy(ds, _deep_copy=True)`` to give every epoch its own execution cache and
  DataContext (``preserve_order=True`` and the training-sized ``target_max_block_size``
  are set on the copy, never on the caller's dataset or the global context).

A plain ``Dataset`` goes through ``ds.iterator()``, so both inputs share one code path.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.data import DataIterator, Dataset
from ray.data.dataset import MaterializedDataset

from . import source_listing
from .constants import TRAINING_BLOCK_BYTES
from .source_executor import _Hold, _quiesce, _size_to_cluster, teardown_counts
from .types import SourceBlock

__all__ = [
    "RaySource",
    "RayFetcher",
    "EpochBlocks",
    "is_ray_input",
    "split_for_ranks",
    "teardown_counts",
    "ray_train_device",
    "other_live_drivers",
]

logger = logging.getLogger(__name__)

def ray_train_device() -> Any:
    """Inside a Ray Train worker, the worker's torch device (``ray.train.torch.get_device``);
    else None. Uses ``ray.train.utils._in_ray_train_worker`` (what Ray's own
    ``iter_torch_batches(device="auto")`` asks)."""
    from ray.train.utils import _in_ray_train_worker

    if not _in_ray_train_worker():
        return None
    from ray.train.torch import get_device

    return get_device()


def other_live_drivers() -> list[tuple[str, int]]:
    """``(job id, pid)`` of the drivers other than this one still connected to this
    process's Ray cluster, from the GCS job table (a driver's entry turns dead when it
    disconnects: ``ray.shutdown()`` or its process ending). Ray has no public API for it
    without the dashboard (``ray.util.state.list_jobs`` needs one)."""
    from ray._private import state

    own = ray.get_runtime_context().get_job_id()
    return [
        (job["JobID"], int(job["DriverPid"]))
        for job in state.jobs()
        if not job["IsDead"] and job["JobID"] != own
    ]


def is_ray_input(obj: Any) -> bool:
    return isinstance(obj, (Dataset, DataIterator))


def _slices(bundle: Any) -> Iterator[SourceBlock]:
    slices = bundle.slices or (None,) * len(bundle.blocks)
    for entry, sl in zip(bundle.blocks, slices, strict=True):
        md = entry.metadata
        rows = None
        num_rows = md.num_rows
        if sl is not None:
            rows = (sl.start_offset, sl.end_offset)
            full = md.num_rows
            num_rows = sl.end_offset - sl.start_offset
            size = md.size_bytes if not full else max(1, md.size_bytes * num_rows // full)
        else:
            size = md.size_bytes
        yield SourceBlock(ref=entry.ref, size_bytes=int(size or 0), num_rows=num_rows, rows=rows)


class EpochBlocks:
    """One epoch's block stream. Iterate it (on the prefetch thread); ``close()`` it (on
    any thread) when the epoch ends or stops early.

    Build it with :meth:`start` (a Dataset copy of ours: the executor starts now, without
    waiting for its first output) or :meth:`from_iterator` (a DataIterator we do not own:
    Ray's own protocol, which waits for the first bundle).

    ``observer(rows_so_far, done, size_bytes)``, if set, is called on the iterating thread
    after each block and once at the end (the prestart of the next epoch listens here);
    ``on_first_block(t)`` once, when the first block comes.
    """

    def __init__(
        self,
        bundles: Iterator[Any],
        executor: Any,
        *,
        data_iterator: DataIterator | None = None,
        hold: _Hold | None = None,
        in_memory: bool = False,
    ) -> None:
        self._bundles = bundles
        self._in_memory = in_memory
        self._left = 0  # slices of the current bundle not yet handed on
        self._executor = executor
        self._it = data_iterator
        self._hold = hold
        self._lock = threading.Lock()
        self._closed = False
        self.exhausted = False
        self.opened_at = time.perf_counter()  # for the prestart's start latency
        self.first_block_at: float | None = None
        self.rows = 0
        self.observer: Callable[..., None] | None = None
        self.on_first_block: Callable[[float], None] | None = None

    @classmethod
    def start(cls, ds: Dataset, *, hold_bytes: int | None = None) -> EpochBlocks:
        """Start ``ds`` (an epoch-private copy) now; with ``hold_bytes``, its executor
        starts no new task while that many output bytes wait for us (see :meth:`release`)."""
        executor = ds._create_executor()
        bundles = ds._execute_dag(executor)
        hold = _Hold(executor)
        hold.budget = hold_bytes
        executor._backpressure_policies.append(hold)
        executor._callbacks.append(hold.steps)
        _size_to_cluster(executor)
        return cls(iter(bundles), executor, hold=hold)

    @classmethod
    def from_iterator(cls, data_iterator: DataIterator, *, in_memory: bool = False) -> EpochBlocks:
        """``in_memory``: the iterator serves a MaterializedDataset's own bundles (every
        block exists already: no pull waits for Ray)."""
        bundles, _stats, executor = data_iterator._to_ref_bundle_iterator()
        return cls(iter(bundles), executor, data_iterator=data_iterator, in_memory=in_memory)

    # -- prestarted streams -----------------------------------------------------------------
    def release(self) -> None:
        """Lift the byte hold: the epoch is running now."""
        if self._hold is not None:
            self._hold.budget = None
            self._hold.wake()

    def queued_bytes(self) -> int:
        """Bytes the executor produced that wait for us (0 when unknown or closed)."""
        hold = self._hold
        if hold is None or self._closed:
            return 0
        try:
            return max(0, hold.queued_bytes())
        except Exception:  # noqa: BLE001 - a stats read must not fail the epoch
            return 0

    def has_idle_cpus(self) -> bool:
        """Fewer of this executor's tasks run than the cluster has CPUs, so a task started
        now by another executor would use a CPU this epoch leaves idle (its tail, or a
        pipeline held back by a slow step). Counts tasks, not their CPU requests (Ray
        Data's map tasks take one CPU by default). False for streams we did not start, or
        when Ray cannot tell."""
        executor = self._executor
        if executor is None or self._hold is None or self._closed:
            return False
        try:
            running = sum(op.num_active_tasks() for op in list(executor._topology))
            cpus = ray.cluster_resources().get("CPU", 0)
        except Exception:  # noqa: BLE001 - unknown: assume busy (no early start)
            return False
        return running < cpus

    def ready(self) -> bool:
        """The next pull returns without waiting for Ray's tasks: slices of the current
        bundle are left, the stream serves a MaterializedDataset's blocks, or the executor
        has output queued for us. A hint, cheap to ask before each pull (the remote epoch
        holds plans back for a fuller chunk only while it is True); False when unknown."""
        return self._left > 0 or self._in_memory or self.queued_bytes() > 0

    def producer_done(self) -> bool:
        """Ray's executor for this stream has finished: every block is produced (they
        may still wait to be consumed); False for streams we did not start."""
        executor = self._executor
        return executor is not None and self._hold is not None and not executor.is_alive()

    # -- stream ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[SourceBlock]:
        observer = self.observer
        hold = self._hold
        for bundle in self._bundles:
            if hold is not None:
                hold.wake()  # bytes left Ray's output queue: its budgets and ours changed
            slices = list(_slices(bundle))
            for i, sb in enumerate(slices):
                self._left = len(slices) - i - 1
                if self.first_block_at is None:
                    self.first_block_at = time.perf_counter()
                    if self.on_first_block is not None:
                        self.on_first_block(self.first_block_at)
                self.rows += sb.num_rows or 0
                if observer is not None:
                    observer(self.rows, False, sb.size_bytes)
                yield sb
        self.exhausted = True
        if observer is not None:
            observer(self.rows, True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        executor, self._executor = self._executor, None
        # The bundles not yet consumed (their block refs) are dropped by _shutdown, after
        # the quiesce: dropping Ray's output iterator shuts its executor down at once
        # (its __del__), cancelling running tasks, which is what _quiesce avoids. A
        # prestarted epoch that was never iterated holds the only reference.
        if executor is not None and executor is threading.current_thread():
            # Garbage collection can run a finalizer (a dataset's, closing its prestarted
            # stream) on the executor's own thread, which cannot join itself.
            threading.Thread(
                target=self._shutdown, args=(executor,), name="trd-source-teardown", daemon=True
            ).start()
            return
        self._shutdown(executor)

    def _shutdown(self, executor: Any) -> None:
        try:
            if self._hold is not None and executor is not None and not self.exhausted:
                _quiesce(executor, self._hold)
            if self._hold is not None:
                self._hold.wake()  # a paused step sees the shutdown at once
            if self._it is not None:
                self._it._on_iteration_end(executor)
            elif executor is not None:
                executor.shutdown(force=True)
        except Exception:  # noqa: BLE001 - cleanup must not mask the epoch's own error
            logger.warning("torch_raydata: shutting down Ray's executor failed", exc_info=True)
        finally:
            # Even if this object is kept (see close()).
            self._bundles = iter(())


class RaySource:
    """What stage 1 knows about the user's input, across epochs."""

    def __init__(self, data: Dataset | DataIterator, *, preserve_order: bool = False) -> None:
        if not is_ray_input(data):
            raise TypeError(
                f"expected a ray.data.Dataset or ray.data.DataIterator, got "
                f"{type(data).__module__}.{type(data).__name__}; build one with "
                "ray.data.from_items/read_parquet/... or pass ray.train.get_dataset_shard(...)"
            )
        self.data = data
        self.preserve_order = preserve_order
        self.is_shard = isinstance(data, DataIterator)
        # Ray's largest block for the epochs this source starts (set on their copies):
        # TRAINING_BLOCK_BYTES until the loader knows its batch's bytes (see
        # RayIterableDataset._size_blocks).
        self.block_bytes = TRAINING_BLOCK_BYTES
        # The file listing of ``data``, made at its first epoch (see _listed): None before,
        # False when it does not apply, else [(manifest table, metadata, schema)].
        self._listing: Any = None
        self._listing_lock = threading.Lock()

    def num_rows(self) -> int | None:
        """Rows per epoch if known without executing the dataset, else None."""
        if isinstance(self.data, Dataset):
            try:
                n = self.data._meta_count()
            except Exception:  # noqa: BLE001 - unknown is an answer, not an error
                return None
            return int(n) if n is not None else None
        return None

    def listed_rows(self) -> int | None:
        """Rows per epoch, exact, from the file listing made at the first epoch (its
        parquet footers), when the plan keeps every listed row
        (``source_listing.rows_of_listing``); None before the listing, or when unsure.
        For the next epoch's prestart only: ``num_rows()`` (len(), the DDP cap) does not
        change once the first epoch ran."""
        listing = self._listing
        if not isinstance(listing, list) or not isinstance(self.data, Dataset):
            return None
        return source_listing.rows_of_listing(self.data, listing)

    def ends_in_map(self) -> bool:
        """True when the dataset's last stage is a map (a read, or task-pool
        ``map_batches`` and kin: ``AbstractMap`` in Ray 2.60), so a ``map_batches``
        appended to it fuses into the same task: no extra task, no extra copy through the
        object store. False for materialized data, shuffles and actor-pool maps (those
        would run an appended stage as a task of its own)."""
        if not isinstance(self.data, Dataset):
            return False
        from ray.data._internal.logical.operators.map_operator import AbstractMap

        dag = self.data._logical_plan.dag
        # Ray 2.60 keeps a map's compute strategy in ``AbstractMap.compute``.
        compute = getattr(dag, "compute", None)
        return isinstance(dag, AbstractMap) and type(compute).__name__ != "ActorPoolStrategy"

    def column_names(self) -> list[str] | None:
        """Column names if the schema is known without executing, else None."""
        try:
            if isinstance(self.data, Dataset):
                schema = self.data.schema(fetch_if_missing=False)
            else:
                return None
        except Exception:  # noqa: BLE001
            return None
        return list(schema.names) if schema is not None else None

    def open(
        self,
        transform: Callable[[Dataset], Dataset] | None = None,
        *,
        hold_bytes: int | None = None,
        may_list: bool = True,
    ) -> EpochBlocks:
        """Start one epoch of the stream; ``transform`` (a Dataset input only) appends stages
        for this epoch, e.g. the resume filter. ``hold_bytes``: see :meth:`EpochBlocks.start`.
        ``may_list``: the file listing may be made here if it is not yet (it waits for Ray,
        like Ray's own first bundle does); False (a prestart, off the epoch's own
        ``iter()``) uses it only when made, else Ray lists inside the executor. Otherwise
        returns at once for a Dataset input (the executor runs in Ray's thread)."""
        if isinstance(self.data, Dataset):
            if transform is None and isinstance(self.data, MaterializedDataset):
                # Materialized: Ray serves the cached bundle without starting an executor
                # (nothing to corrupt, see below; and a copy would cost a full executor
                # start per epoch: measured +25-55% rows/s, first batch 58 -> 22 ms). Its
                # block order is fixed, so preserve_order holds.
                return EpochBlocks.from_iterator(self.data.iterator(), in_memory=True)
            ds = self.data if transform is None else transform(self.data)
            ds = self._listed(ds, may_list=may_list)
            return EpochBlocks.start(self._epoch_copy(ds), hold_bytes=hold_bytes)
        if transform is not None:
            raise ValueError("a DataIterator input cannot take extra stages; filter locally")
        return EpochBlocks.from_iterator(self.data)

    def serves_materialized(self, transform: Any = None) -> bool:
        """An epoch opened with ``transform`` reads the MaterializedDataset's own blocks
        (the same references every epoch), so a ``block_cache.BlockCache`` may serve them."""
        return transform is None and isinstance(self.data, MaterializedDataset)

    def can_prestart(self) -> bool:
        """Whether an epoch can be started ahead of time: a Dataset we copy per epoch (a
        DataIterator shard starts its epochs in step with the other ranks; a
        MaterializedDataset starts in milliseconds)."""
        return isinstance(self.data, Dataset) and not isinstance(self.data, MaterializedDataset)

    def _listed(self, ds: Dataset, *, may_list: bool = True) -> Dataset:
        """``ds`` reading from a file listing made once, instead of listing every epoch.

        Ray 2.60's file reads (``read_parquet``...) list their files at every execution,
        i.e. every epoch, and for parquet that starts 32 footer-reading actors each time:
        1-5 s and a burst of process starts before the first block, on the critical path
        of every epoch. The listing of one source does not change between epochs (Ray's
        previous reader resolved it once, at ``read_parquet()``), so the first epoch runs
        the plan's ``ListFiles`` operator alone, keeps its small manifest tables, and each
        epoch's copy starts from them (put into the object store per epoch, so no
        reference outlives the epoch). Not applied when files are shuffled per execution
        (``shuffle="files"``) or the plan lists more than once; any failure falls back to
        Ray's own listing.
        """
        from ray.data._internal.logical.operators import InputData, ListFiles

        lists = [op for op in ds._logical_plan.dag.post_order_iter() if isinstance(op, ListFiles)]
        if len(lists) != 1:
            return ds
        listing_op = lists[0]
        with self._listing_lock:
            if self._listing is None and may_list:
                self._listing = self._list_once(ds, listing_op)
            listing = self._listing
        if listing is False or listing is None:
            return ds
        try:
            from ray.data._internal.execution.interfaces.ref_bundle import BlockEntry, RefBundle
            from ray.data._internal.logical.interfaces import LogicalPlan

            bundles = [
                RefBundle(blocks=(BlockEntry(ray.put(t), md),), schema=schema, owns_blocks=True)
                for t, md, schema in listing
            ]
            source = InputData(input_data=bundles)
            dag = ds._logical_plan.dag._apply_transform(
                lambda op: source if op is listing_op else op
            )
            return Dataset(
                LogicalPlan(dag, ds.context),
                ds.context,
                copy.copy(ds._in_stats),
                dataset_name=ds._dataset_name,
            )
        except Exception:  # noqa: BLE001 - an optimization: Ray's own listing still works
            logger.warning("torch_raydata: reusing the file listing failed", exc_info=True)
            self._listing = False
            return ds

    @staticmethod
    def _list_once(ds: Dataset, listing_op: Any) -> Any:
        """Run ``listing_op`` alone; its manifest tables, or False if not applicable."""
        if listing_op.shuffle_config_factory() is not None:
            return False  # a new file order every execution: list every epoch
        listing = source_listing.list_in_process(ds, listing_op)
        if listing is None:
            listing = source_listing.list_with_ray(ds, listing_op)
        if not listing:
            return listing
        units, min_bytes = source_listing.read_units(ds, listing_op)
        return source_listing.split_listing(listing, units, min_bytes)

    def _epoch_copy(self, ds: Dataset) -> Dataset:
        """An epoch-private copy (own execution cache and context). Ray's
        _CacheMetadataIterator writes the rows seen so far into the dataset's cache on ANY
        StopIteration, including the one a shut-down executor raises when an epoch stops
        early: iterating the caller's dataset would leave its count() (and our len(), and
        the equal-steps cap across ranks) at a partial row count."""
        ds = Dataset.copy(ds, _deep_copy=True)
        ctx = ds.context
        if self.preserve_order:
            ctx.execution_options.preserve_order = True
        # Blocks sized for training, not storage: Ray's default target (128 MiB) makes
        # the first batch wait for a whole block, e.g. 200 decoded 224 px images.
        target = ctx.target_max_block_size
        if target is None or target > self.block_bytes:
            ctx.target_max_block_size = self.block_bytes
        return ds


def split_for_ranks(ds: Dataset, n: int, *, preserve_order: bool = False) -> list[DataIterator]:
    """``ds.streaming_split(n, equal=True)`` of a copy with training-sized blocks (and,
    with ``preserve_order``, ordered); the caller's dataset is not mutated. Used by
    ``distributed.shard`` on rank 0."""
    if not isinstance(ds, MaterializedDataset):
        ds = RaySource(ds, preserve_order=preserve_order)._epoch_copy(ds)
    elif preserve_order and not ds.context.execution_options.preserve_order:
        ds = Dataset.copy(ds, _deep_copy=True)
        ds.context.execution_options.preserve_order = True
    return ds.streaming_split(n, equal=True)


class RayFetcher:
    """The prefetcher's view of the object store (see ``prefetch.Fetcher``)."""

    def wait(self, refs: list[Any], *, timeout: float, num_returns: int | None = None) -> list[Any]:
        ready, _ = ray.wait(
            refs,
            num_returns=len(refs) if num_returns is None else num_returns,
            timeout=timeout,
            fetch_local=True,
        )
        return ready

    def get(self, refs: list[Any]) -> list[Any]:
        return ray.get(refs)
