"""``RayIterableDataset``: a torch ``IterableDataset`` over a Ray Dataset or DataIterator.

Owns the user-facing class: its options (checked at construction with ``_checks``),
epochs (``set_epoch``, one running epoch at a time), ``len()``, the progress bar option and
the stats of the current/last epoch. Each iteration builds one
:class:`~torch_raydata.pipeline.run.EpochRun` (stages 2-6) over stage 1's block stream.

Does not own the loader state's format, checks or resume planning (``resume/state.py``:
this class only hands it the epoch's tally), splitting across ranks
(``distributed/sharding.py``), the stages (``pipeline/``) nor the transports.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ._checks import check_bool, check_int
from .collate import DefaultCollate
from .distributed import RankSource, world
from .guards import check_caller, check_loadable, is_peek, make_loader, mark_reproducible
from .kernels.ids import check_column
from .memory.buffers import BufferPool
from .pipeline.batching import num_batches
from .pipeline.block_cache import BlockCache
from .pipeline.constants import MATERIALIZED_CACHE_BYTES, TRAINING_BLOCK_BYTES, usable_cpus
from .pipeline.prestart import NextEpoch
from .pipeline.progress_bar import EpochProgressBar
from .pipeline.run import EpochProgress, EpochRun, PipelineConfig
from .pipeline.source import EpochBlocks, RayFetcher, RaySource
from .pipeline.stats import LoaderStats, StatsRecorder
from .resume import ResumeState, fingerprint
from .transports import RemoteCollate, Transport, resolve_transport

__all__ = ["RayIterableDataset"]


class RayIterableDataset(IterableDataset):
    """Batches from a Ray Dataset, ready for the training step.

    Yields whole batches (``dict[str, torch.Tensor]`` by default): iterate it directly, or
    through ``ds.loader()`` (``DataLoader(ds, batch_size=None)``; a DataLoader that would
    batch again is refused). Each ``iter()`` runs one epoch; epochs count up from 0
    (``set_epoch`` to choose). One epoch runs at a time per dataset: a new ``iter()`` stops
    the running one, and a ``next()`` on the stopped one raises (never a silently short
    epoch). An iteration that stops after at most one batch (a peek:
    ``next(iter(loader))``) does not use up its epoch: the next ``iter()`` runs the same
    epoch from its start, with the same shuffle.

    Args:
        dataset: a ``ray.data.Dataset``, or a ``ray.data.DataIterator`` (e.g. the shard
            from ``ray.train.get_dataset_shard("train")``).
        batch_size: rows per batch.
        collate_fn: ``pyarrow.Table -> batch``; None means ``trd.collate.DefaultCollate()``.
        num_workers: threads of the format/collate pool (stage 4). Not DataLoader workers.
            None (default): start one and add one at a time, up to ``min(4, CPU cores this
            process may use)``, while the training step waits on collate; every thread
            that wants the GIL takes it from the step, so none is started that the load
            does not need (docs/performance.md, section 4). An int: exactly
            that many threads from the start.
        prefetch_batches: how many batches stages 2-4 run ahead of the training step.
        preserve_order: yield batches in dataset order (stage 5; also asks Ray's executor
            to keep block order for a ``Dataset`` input, without mutating the caller's).
        drop_last: drop the last partial batch (its rows are counted in ``stats()``).
        shuffle_buffer_size: rows in the local shuffle buffer; None means no shuffle.
        shuffle_seed: seed for the local shuffle (with the epoch: a new order each epoch,
            the same for the same seed, epoch and block order).
        device: None/"cpu", "cuda", "cuda:1" or a ``torch.device``.
        transport: "auto" | "local" | "cuda" | "nixl" | "shm" | a
            ``trd.transports.Transport``. "shm": collate in Ray actors on this node into
            shared memory this process maps, so the training step's process runs no
            collate thread (``trd.transports.ShmTransport``; opt-in, see its docstring).
        id_column: a unique int (or str) column; its values travel with each batch.
        num_rows: rows per epoch when you know it and Ray does not without executing
            (e.g. after a 1:1 ``map_batches``, or ``read_parquet``): gives ``len()``, and
            the equal-steps cap across DDP ranks. None: ask the dataset.
        progress: show a tqdm bar per epoch (plain-PyTorch loops; Lightning has its own):
            True, or a dict of ``tqdm`` arguments (``desc``, ``file``, ``position``...).
            Its total is the epoch's batches when ``len()`` is known; it shows rows/s and
            the step's wait for data, and closes when the epoch ends, breaks or fails.
            Default False: no bar.
        prestart: epoch pipelining (default True): while an epoch runs, the next one's
            Ray executor is started, so that its first batch is ready when the step asks
            for it instead of after Ray's executor start (1-5 s for a ``read_parquet``
            pipeline on Ray 2.60). It starts once the running epoch has nothing left to
            compute (its stream ended, or its executor produced every block), so the two
            never compete for CPUs; its output is held to the prefetch window's bytes
            until its epoch begins (``stats().next_epoch_bytes``). A prestarted stream
            has consumed nothing (``state_dict`` is unaffected) and is torn down by
            ``close()``, ``load_state_dict`` or garbage collection. Single process and
            ``Dataset`` inputs only: a ``MaterializedDataset`` starts in milliseconds, and
            a DataIterator shard (Ray Train, DDP) starts its epochs in step with the other
            ranks. False: every epoch starts at ``iter()``.
        spill_dir: a directory (e.g. the checkpoint's) where ``state_dict()`` writes a
            consumed-ID set too large to keep inline (over 64 MB); None: such a state
            raises.

    Edge cases: an empty dataset (0 rows) gives epochs of 0 batches and ``len() == 0``,
    not an error; ``batch_size`` larger than the dataset gives one partial batch (none
    with ``drop_last``, its rows counted in ``stats().rows_dropped``). When the schema is
    known before execution, a ``collate_fn`` with a ``check_columns(names)`` method (the
    built-in ones: ``dtypes`` keys, ``PadCollate`` columns) is checked at construction;
    otherwise at the first batch.

    Distributed: under torch.distributed (torchrun, Lightning DDP) a ``Dataset`` is split
    across the ranks at the first epoch (``torch_raydata.distributed``; every rank must
    iterate each epoch), and ``len()`` is per rank. Pass ``ds.iterator()`` to read the
    whole dataset on one rank.

    Example:
        >>> ds = trd.RayIterableDataset(ray.data.range(1000), batch_size=100)
        >>> for batch in torch.utils.data.DataLoader(ds, batch_size=None):
        ...     batch["id"].shape
        torch.Size([100])
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int = 256,
        collate_fn: Callable[[Any], Any] | None = None,
        num_workers: int | None = None,
        prefetch_batches: int = 4,
        preserve_order: bool = False,
        drop_last: bool = False,
        shuffle_buffer_size: int | None = None,
        shuffle_seed: int | None = None,
        device: str | torch.device | None = None,
        transport: str | Transport = "auto",
        id_column: str | None = None,
        num_rows: int | None = None,
        progress: bool | dict[str, Any] = False,
        prestart: bool = True,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__()
        num_rows = check_int("num_rows", num_rows, 0, allow_none=True)
        prestart = check_bool("prestart", prestart)
        preserve_order = check_bool("preserve_order", preserve_order)
        drop_last = check_bool("drop_last", drop_last)
        if not isinstance(progress, (bool, dict)):
            raise ValueError(f"{progress=} must be True, False or a dict of tqdm arguments")
        self.progress = progress
        batch_size = check_int("batch_size", batch_size, 1)
        num_workers = check_int("num_workers", num_workers, 1, allow_none=True)
        grow_workers = num_workers is None
        if num_workers is None:
            num_workers = min(4, usable_cpus())
        prefetch_batches = check_int("prefetch_batches", prefetch_batches, 1)
        shuffle_buffer_size = check_int("shuffle_buffer_size", shuffle_buffer_size, 1, True)
        shuffle_seed = check_int("shuffle_seed", shuffle_seed, 0, allow_none=True)
        if collate_fn is not None and not callable(collate_fn):
            raise ValueError(
                f"collate_fn={collate_fn!r} must be callable (pyarrow.Table -> batch) or None"
            )
        if spill_dir is not None and not isinstance(spill_dir, str):
            raise ValueError(f"spill_dir={spill_dir!r} must be a directory path (str) or None")
        if id_column is not None and not isinstance(id_column, str):
            raise ValueError(f"id_column={id_column!r} must be a column name (str) or None")
        # Under torch.distributed a Dataset is split across the ranks at the first epoch
        # (distributed/sharding.py); a DataIterator (e.g. a Ray Train shard) is used as is.
        self._source = RankSource(dataset, preserve_order=preserve_order, num_rows=num_rows)
        names = self._source.column_names()
        if id_column is not None and names is not None:
            check_column(id_column, names)
        self.config = PipelineConfig(
            batch_size=batch_size,
            num_workers=num_workers,
            grow_workers=grow_workers,
            prefetch_batches=prefetch_batches,
            preserve_order=preserve_order,
            drop_last=drop_last,
            shuffle_buffer_size=shuffle_buffer_size,
            shuffle_seed=shuffle_seed,
            id_column=id_column,
        )
        self.transport = resolve_transport(transport, device)
        self.device = self.transport.device
        # The default collate writes into the transport's staging memory when it has some
        # (pinned, for CUDA), else into recycled host memory (see memory/buffers.py).
        self.buffer_pool = BufferPool()
        allocator = self.transport.host_allocator or self.buffer_pool
        self.collate_fn = (
            collate_fn if collate_fn is not None else DefaultCollate(allocator=allocator)
        )
        check_columns = getattr(self.collate_fn, "check_columns", None)
        if names is not None and callable(check_columns):
            check_columns(names)  # e.g. dtypes/PadCollate naming a missing column: fail now
        self._next_epoch = 0
        # A loaded state's hold on the next epoch (torch_raydata.resume), and where to
        # spill a consumed-ID set too large for a checkpoint.
        self._resume = ResumeState()
        self._spill_dir = spill_dir
        # The progress of the iteration that advanced the epoch counter, while a peek of it
        # may still give the epoch back (guards.is_peek); None once set_epoch/load chose.
        self._advanced_by: EpochProgress | None = None
        self._lock = threading.Lock()
        # Epoch pipelining (pipeline/prestart.py): the next epoch's stream, started while
        # this one runs. Single process, Dataset input only (a DataIterator shard starts
        # its epochs in step with the other ranks). The opener holds the source, never
        # the dataset, so the finalizer below can tear a prestarted stream down at GC.
        self._prestart_source = self._source.ray_source
        self._next = NextEpoch(
            functools.partial(_open_prestarted, self._prestart_source, batch_size),
            enabled=prestart and self._prestart_source.can_prestart(),
        )
        weakref.finalize(self, self._next.close)
        self._run_ref: weakref.ref[EpochRun] | None = None
        # A MaterializedDataset's blocks, deserialized once (block_cache.BlockCache).
        self._block_cache = BlockCache(MATERIALIZED_CACHE_BYTES)
        self._progress: EpochProgress | None = None  # of the running or last epoch
        self._last_stats: StatsRecorder | None = None

    # -- torch protocol ---------------------------------------------------------------------
    def __iter__(self) -> EpochRun:
        check_caller(self.config.batch_size)
        t_iter = time.perf_counter()
        with self._lock:
            previous = self._current_run()
            if previous is not None:
                previous.supersede()  # its next() raises from now on, never ends it quietly
            self._give_back_peek()
            epoch = self._next_epoch
            self._next_epoch += 1
            skip = self._resume.begin(epoch)
            stats = StatsRecorder(epoch)
            stats.start(t_iter)  # from iter(): the executor's start counts
            plan = self._resume.plan(epoch, self._source, self.config.id_column, world()[1])
            total_rows = plan.total_rows
            blocks = self._open_epoch(stats, plan.transform, total_rows)
            run_class: Callable[..., Any] = EpochRun
            if isinstance(self.transport, RemoteCollate):  # collate in actors (nixl, shm)
                run_class = self.transport.epoch_class()
            max_batches = self._source.max_batches(
                self.config.batch_size, self.config.drop_last, total_rows
            )
            cached = (
                run_class is EpochRun  # remote collate actors fetch blocks themselves
                and world()[1] == 1
                and self._source.ray_source.serves_materialized(plan.transform)
            )
            run = run_class(
                blocks,
                self._block_cache.fetcher(RayFetcher()) if cached else RayFetcher(),
                self.collate_fn,
                self.transport,
                self.config,
                epoch=epoch,
                stats=stats,
                skip_batches=skip,
                on_close=blocks.close,
                record_ids=self.config.id_column is not None,
                max_batches=max_batches,
                drop_keys=plan.drop_keys,
            )
            run.on_error = self._next.discard  # a failing epoch keeps no next epoch
            self._run_ref = weakref.ref(run)
            # Kept strongly: a run dropped after `break` is collected, its progress is not.
            self._progress = getattr(run, "progress", None)
            self._advanced_by = self._progress
            if self._progress is not None:
                self._progress.expected_batches = self._epoch_batches(max_batches, total_rows)
                self._resume.attach(self._progress, rank=world()[0])
            self._last_stats = stats
            if self.progress is not False:
                self._attach_progress_bar(stats, epoch, skip, max_batches, total_rows)
            return run

    def _open_epoch(self, stats: StatsRecorder, transform: Any, total_rows: int | None) -> Any:
        """Stage 1 for this epoch: the prestarted stream if one is ready and this epoch
        runs the plain stream, else a new one; then watch it to prestart the next."""
        plain = transform is None and world()[1] == 1
        claimed = self._next.claim() if plain else None
        if not plain:
            self._next.discard()
        if claimed is not None:
            blocks, lead = claimed
            stats.prestarted(lead)
            return self._watch(blocks, stats, plain)
        _size_blocks(self._source.ray_source, self.config.batch_size, self._next.row_bytes)
        if transform is not None:
            blocks = self._source.open(stats, transform=transform, total_rows=total_rows)
        else:
            blocks = self._source.open(stats)
        return self._watch(blocks, stats, plain)

    def _watch(self, blocks: Any, stats: StatsRecorder, plain: bool) -> Any:
        """Stage 1's hooks: the epoch's first block (stats) and, for a plain stream, the
        next epoch's start and the row size (pipeline/prestart.py)."""
        blocks.on_first_block = stats.first_block
        if plain:
            window = self.config.prefetch_batches * self.config.batch_size
            # Rows of this epoch for the lead: known to Ray, or (first epoch of a file
            # read Ray cannot count) from the footers of the listing made at its open.
            expected = self.num_rows()
            if expected is None:
                expected = self._source.ray_source.listed_rows()
            blocks.observer = self._next.watch(blocks, window_rows=window, expected_rows=expected)
        return blocks

    def _epoch_batches(self, max_batches: int | None, total_rows: int | None) -> int | None:
        """Batches this epoch yields on this rank, if known before it runs."""
        if max_batches is not None:
            return max_batches
        rows = total_rows if total_rows is not None else self.num_rows()
        if rows is None or world()[1] > 1 and not self._source.is_shard:
            return None
        return num_batches(rows, self.config.batch_size, self.config.drop_last)

    def _attach_progress_bar(
        self,
        stats: StatsRecorder,
        epoch: int,
        skip: int,
        max_batches: int | None,
        total_rows: int | None,
    ) -> None:
        """A tqdm bar listening to this epoch's stats (closed when the epoch finishes)."""
        total = max_batches
        if total is None:
            rows = total_rows if total_rows is not None else self.num_rows()
            total = num_batches(rows, self.config.batch_size, self.config.drop_last)
        if total is not None:
            total = max(0, total - skip)  # skipped batches (best-effort resume) never show
        options = self.progress if isinstance(self.progress, dict) else {}
        stats.add_listener(EpochProgressBar(epoch, total, **options))

    def __len__(self) -> int:
        rows = self.num_rows()
        if rows is None:
            raise TypeError(
                "len() is unknown: the dataset's row count is not known without executing it "
                "(e.g. after a filter, or for a DataIterator shard); materialize() it to know, "
                "or pass num_rows= when you know it"
            )
        return num_batches(rows, self.config.batch_size, self.config.drop_last)

    def num_rows(self) -> int | None:
        """Rows per epoch if known without executing the dataset, else None."""
        return self._source.num_rows()

    # -- epochs, state, stats -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration runs (seeds the shuffle)."""
        self._next_epoch = check_int("epoch", epoch, 0)
        self._advanced_by = None  # chosen: a peek gives nothing back

    def loader(self, **kwargs: Any) -> DataLoader:
        """A ``torch.utils.data.DataLoader`` over this dataset, configured for it:
        ``batch_size=None`` (batches come whole) and no worker processes (collate runs on
        this dataset's ``num_workers`` threads). ``kwargs`` go to the DataLoader (e.g.
        ``pin_memory``, ``collate_fn`` applied to each whole batch); ``batch_size``,
        ``shuffle``, ``sampler``, ``batch_sampler``, ``drop_last`` and ``num_workers``
        are refused with the option of this dataset that does the job.

        Example:
            >>> for batch in ds.loader(): ...
        """
        return make_loader(self, **kwargs)

    def _give_back_peek(self) -> None:
        """A peek (guards.is_peek) gives its epoch back, and a best-effort resume's skip."""
        p = self._advanced_by
        run = self._current_run()
        if p is None or p is not self._progress or not is_peek(p, run is not None and not run.closed):
            return
        self._next_epoch = p.epoch
        if p.batches_skipped:
            self._resume.skip_batches = p.batches_skipped
        self._advanced_by = self._progress = None

    def _current_run(self) -> EpochRun | None:
        return self._run_ref() if self._run_ref is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Where the training step is in the epoch, small enough for a checkpoint.

        With ``id_column``: the IDs of every row *yielded to the training step* this epoch
        (not prefetched or collated-and-waiting ones), as a compact set (``exact=True``);
        :meth:`load_state_dict` then runs the rest of the epoch over exactly the rows not in
        it. Rows yielded after the checkpoint are yielded again after a restore (the model
        rolls back too). Without ``id_column``: epoch and batches consumed, and resume is a
        best-effort skip-ahead (``exact=False``; not exact under shuffle or a changed block
        order).

        A shuffle with neither ``shuffle_seed`` nor ``id_column`` cannot resume mid-epoch:
        such a state carries ``reproducible=False``, a ``RuntimeWarning`` says so when it
        is taken, and :meth:`load_state_dict` refuses it unless ``strict=False``. A peek
        (see the class docstring) consumed nothing.

        Raises ``ValueError`` when the ``id_column`` values yielded this epoch repeat (a
        non-unique column would make the resume skip rows never trained on): checked here,
        before any state is written. Repeats across ranks are not seen by one rank.
        """
        return self._state_dict(consumer_lag=0)

    def _state_dict(self, *, consumer_lag: int) -> dict[str, Any]:
        """:meth:`state_dict`, leaving out the last ``consumer_lag`` batches yielded
        (received, not yet trained on: Lightning may fetch one ahead, RayDataModule)."""
        with self._lock:
            self._give_back_peek()
        state = self._resume.state_dict(
            self._progress,
            next_epoch=self._next_epoch,
            consumer_lag=consumer_lag,
            id_column=self.config.id_column,
            batch_size=self.config.batch_size,
            fingerprint=fingerprint(self.config, self._source),
            world_size=world()[1],
            spill_dir=self._spill_dir,
            rank=world()[0],
        )
        return mark_reproducible(state, self.config)

    @property
    def spill_dir(self) -> str | None:
        """Where large consumed-ID sets are spilled (the ``spill_dir`` argument)."""
        return self._spill_dir

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Resume from :meth:`state_dict` (possibly merged over ranks): the next iteration
        runs ``state["epoch"]`` over the rows not consumed in it, then epochs run in full.

        A state from another configuration (``id_column``, columns, row count, or — for the
        skip-ahead mode — batch size and seed) raises ``ValueError`` rather than silently
        starting afresh; so does a state that cannot resume exactly (``reproducible=False``,
        see :meth:`state_dict`). ``strict=False`` accepts a differing batch size or seed,
        and a state that cannot resume exactly (a best-effort skip-ahead).
        """
        check_loadable(state, strict)
        epoch = self._resume.load(
            state,
            fingerprint=fingerprint(self.config, self._source),
            id_column=self.config.id_column,
            strict=strict,
            search_dir=self.spill_dir,
        )
        self._next.discard()  # the resumed epoch may run another stream (a filter)
        self.set_epoch(epoch)

    def start_next_epoch(self, *, wait: bool = True) -> bool:
        """Start the next epoch's stream now, ahead of its ``iter()`` (epoch pipelining,
        see ``prestart``); e.g. ``RayDataModule`` starts the val stream near the end of a
        train epoch. ``wait=False``: on a short-lived thread of the dataset's (starting an
        executor plans the Dataset, ~0.1 s), not the caller's. Returns whether a
        prestarted stream is now held or being started (False when ``prestart`` is off or
        does not apply, or the next epoch will run another stream). Cheap to call again:
        one stream is held at most."""
        if self._resume.epoch == self._next_epoch or world()[1] > 1 or not self._next.enabled:
            return False  # a loaded state's epoch may run a filtered stream
        window = self.config.prefetch_batches * self.config.batch_size
        if wait:
            self._next.start(self._next.hold_for(window))
            return self._next.pending
        self._next.start_soon(self._next.hold_for(window))
        return True

    def stats(self) -> LoaderStats:
        """Stats of the running epoch, or of the last one if none is running, with the
        prestarted next epoch's stream (if any) and the transport's staging memory
        (pinned bytes in use and held, pageable fallbacks by reason: ``TransportStats``)."""
        recorder = self._last_stats or StatsRecorder(self._next_epoch)
        snap = recorder.snapshot(time.perf_counter())
        memory = self.transport.memory_stats()
        return dataclasses.replace(
            snap,
            next_epoch_prestarted=self._next.pending,
            next_epoch_bytes=self._next.queued_bytes(),
            pinned_bytes_in_use=memory.pinned_bytes_in_use,
            pinned_bytes_reserved=memory.pinned_bytes_reserved,
            pageable_fallbacks=dict(memory.pageable_fallbacks),
            cached_blocks=len(self._block_cache),
            cached_block_bytes=self._block_cache.bytes,
        )

    def close(self, *, close_transport: bool = True) -> None:
        """Stop the running epoch (if any), tear down a prestarted next epoch, and
        release the transport (``close_transport=False``: leave it to its owner, e.g. a
        transport instance shared with other datasets). Iterating again afterwards
        starts afresh."""
        run = self._current_run()
        if run is not None:
            run.close()
        self._next.discard()
        try:
            if close_transport:
                self.transport.close()
        finally:
            self.buffer_pool.clear()
            self._block_cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_run_ref"] = None
        state["_progress"] = None
        state["_last_stats"] = None
        state["_next"] = None  # a prestarted stream belongs to this process
        state["_block_cache"] = None  # deserialized blocks belong to this process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._block_cache = BlockCache(MATERIALIZED_CACHE_BYTES)
        self._next = NextEpoch(
            functools.partial(_open_prestarted, self._prestart_source, self.config.batch_size),
            enabled=False,
        )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"RayIterableDataset(batch_size={c.batch_size}, num_workers="
            f"{f'up to {c.num_workers}' if c.grow_workers else c.num_workers}, "
            f"prefetch_batches={c.prefetch_batches}, preserve_order={c.preserve_order}, "
            f"shuffle_buffer_size={c.shuffle_buffer_size}, transport={self.transport!r})"
        )


def _size_blocks(source: RaySource, batch_size: int, row_bytes: float | None) -> None:
    """Ray's blocks for the epochs ``source`` starts: about one batch at the measured row
    size, at least ``TRAINING_BLOCK_BYTES`` (see pipeline/constants.py)."""
    if row_bytes is not None:
        source.block_bytes = max(TRAINING_BLOCK_BYTES, int(row_bytes * batch_size))


def _open_prestarted(
    source: RaySource, batch_size: int, hold_bytes: int, row_bytes: float | None
) -> EpochBlocks:
    """The next epoch's plain stream, held to ``hold_bytes`` until claimed."""
    _size_blocks(source, batch_size, row_bytes)
    # Never list files here (this may run on the prefetch or the training step's thread,
    # and a listing waits for Ray): a prestart before the first epoch lets Ray list.
    return source.open(hold_bytes=hold_bytes, may_list=False)
