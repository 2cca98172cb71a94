"""Stage 1: source — a Ray Dataset or DataIterator -> this rank's block references.

THE one module that touches Ray internals. What it relies on (pinned by
``tests/test_source_pins.py``, so a Ray upgrade fails loudly here and nowhere else):

* ``DataIterator._to_ref_bundle_iterator() -> (Iterator[RefBundle], stats, executor)``
  and ``DataIterator._on_iteration_end(executor)``: the same pair Ray's own
  ``iter_batches`` uses. ``_on_iteration_end`` shuts the executor down (or, for a
  ``streaming_split`` shard, tells the SplitCoordinator this split is done) at once
  when an epoch stops early, instead of whenever GC gets to it.
* ``RefBundle.blocks`` entries with ``.ref`` and ``.metadata.{num_rows,size_bytes}``,
  and ``RefBundle.slices`` (``None`` or ``.start_offset``/``.end_offset`` per block).
* ``Dataset._meta_count()``: the row count when known without executing anything.
* ``ray.data.dataset.MaterializedDataset``: served from its cached bundle, no executor.
* ``Dataset._logical_plan.dag`` and ``AbstractMap`` (``ends_in_map``): whether an
  appended ``map_batches`` fuses into the last stage's task.
* ``Dataset.copy(ds, _deep_copy=True)`` to give every epoch its own execution cache and
  DataContext (``preserve_order=True`` is set on the copy, never on the caller's dataset;
  and see ``RaySource.open`` for the row-count cache an early stop would otherwise corrupt).

A plain ``Dataset`` goes through ``ds.iterator()``, so both inputs share one code path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.data import DataIterator, Dataset
from ray.data.dataset import MaterializedDataset

from .types import SourceBlock

__all__ = ["RaySource", "RayFetcher", "EpochBlocks", "is_ray_input", "split_for_ranks"]

logger = logging.getLogger(__name__)


def is_ray_input(obj: Any) -> bool:
    return isinstance(obj, (Dataset, DataIterator))


class EpochBlocks:
    """One epoch's block stream. Iterate it (on the prefetch thread); ``close()`` it
    (on the consumer thread) when the epoch ends or stops early."""

    def __init__(self, data_iterator: DataIterator) -> None:
        self._it = data_iterator
        bundles, _stats, executor = data_iterator._to_ref_bundle_iterator()
        self._bundles = bundles
        self._executor = executor
        self._closed = False

    def __iter__(self) -> Iterator[SourceBlock]:
        for bundle in self._bundles:
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
                yield SourceBlock(
                    ref=entry.ref, size_bytes=int(size or 0), num_rows=num_rows, rows=rows
                )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._it._on_iteration_end(self._executor)
        except Exception:  # noqa: BLE001 - cleanup must not mask the epoch's own error
            logger.warning("torch_raydata: shutting down Ray's executor failed", exc_info=True)
        # Drop the bundles not yet consumed (their block refs) even if this object is kept.
        self._bundles, self._executor = iter(()), None


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

    def num_rows(self) -> int | None:
        """Rows per epoch if known without executing the dataset, else None."""
        if isinstance(self.data, Dataset):
            try:
                n = self.data._meta_count()
            except Exception:  # noqa: BLE001 - unknown is an answer, not an error
                return None
            return int(n) if n is not None else None
        return None

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
        compute = getattr(dag, "_compute", None)
        is_actor_pool = type(compute).__name__ == "ActorPoolStrategy"
        return isinstance(dag, AbstractMap) and not is_actor_pool

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

    def open(self, transform: Callable[[Dataset], Dataset] | None = None) -> EpochBlocks:
        """Start one epoch of the stream; ``transform`` (a Dataset input only) appends stages
        for this epoch, e.g. the resume filter."""
        if isinstance(self.data, Dataset):
            if transform is None and isinstance(self.data, MaterializedDataset):
                # Materialized: Ray serves the cached bundle without starting an executor
                # (nothing to corrupt, see below; and a copy would cost a full executor
                # start per epoch: measured +25-55% rows/s, first batch 58 -> 22 ms). Its
                # block order is fixed, so preserve_order holds.
                return EpochBlocks(self.data.iterator())
            ds = self.data if transform is None else transform(self.data)
            # Otherwise an epoch-private copy (own execution cache and context). Ray's
            # _CacheMetadataIterator writes the rows seen so far into the dataset's cache on
            # ANY StopIteration, including the one a shut-down executor raises when an epoch
            # stops early: iterating the caller's dataset would leave its count() (and our
            # len(), and the equal-steps cap across ranks) at a partial row count.
            ds = Dataset.copy(ds, _deep_copy=True)
            if self.preserve_order:
                ds.context.execution_options.preserve_order = True
            return EpochBlocks(ds.iterator())
        if transform is not None:
            raise ValueError("a DataIterator input cannot take extra stages; filter locally")
        return EpochBlocks(self.data)


def split_for_ranks(ds: Dataset, n: int, *, preserve_order: bool = False) -> list[DataIterator]:
    """``ds.streaming_split(n, equal=True)``; with ``preserve_order`` on an ordered copy (the
    caller's dataset is not mutated). Used by ``distributed.shard`` on rank 0."""
    if preserve_order and not ds.context.execution_options.preserve_order:
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
