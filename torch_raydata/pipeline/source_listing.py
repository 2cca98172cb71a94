"""Stage 1's file listing, made once per source: part of ``source.py``'s boundary on Ray
internals (only ``source.py`` imports this module; what it relies on is listed in
``source.py``'s docstring and pinned by ``tests/test_prestart.py``).

Also: the exact row count of an epoch from a listing's footers, when the plan keeps
every listed row (:func:`rows_of_listing`; the prestart's lead at the first epoch).

Why a listing of our own: Ray 2.60 lists a ``read_parquet`` at every execution, in a task
of its own that starts 32 footer-reading actor processes whatever the file count; see
``RaySource._listed`` for the reuse across epochs and :func:`list_in_process` for the
listing of a few files without those actors.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import ray
from ray.data import Dataset

__all__ = [
    "LOCAL_LISTING_MAX_FILES",
    "list_in_process",
    "list_with_ray",
    "read_units",
    "rows_of_listing",
    "split_listing",
]

logger = logging.getLogger(__name__)


def list_with_ray(ds: Dataset, listing_op: Any) -> Any:
    """Ray's listing of ``listing_op``, run alone in an executor of its own: its
    manifest tables, or False if that failed."""
    try:
        from ray.data._internal.logical.interfaces import LogicalPlan

        ctx = ds.context.copy()
        listed = Dataset(LogicalPlan(listing_op, ctx), ctx, copy.copy(ds._in_stats))
        out = []
        for bundle in listed.iter_internal_ref_bundles():
            for entry in bundle.blocks:
                out.append((ray.get(entry.ref), entry.metadata, bundle.schema))
        return out
    except Exception:  # noqa: BLE001 - an optimization: Ray's own listing still works
        logger.warning("torch_raydata: listing the files once failed", exc_info=True)
        return False


# Up to this many files, the listing reads their footers in this process (see
# list_in_process); more, and Ray's listing spreads them over its footer-reading actors.
LOCAL_LISTING_MAX_FILES = 64


def list_in_process(ds: Dataset, op: Any) -> list[tuple[Any, Any, Any]] | None:
    """The listing of a few files, made in this process; None to let Ray list.

    Ray 2.60 lists a ``read_parquet`` in a task of its own executor that starts 32
    footer-reading actor processes whatever the file count: measured 2.4-3.9 s for 6
    files on 2 cores, all of it before the first block of the first epoch is read, plus
    the cost of 31 idle processes starting next to that read. Footers of a few files
    are a few small reads: this runs Ray's own listing functions (path discovery, the
    footer reader, the bin packer) here, on copies of the operator's indexer and
    partitioner, with a footer reader in this process instead of actors. Anything
    unexpected -- another indexer, a pushed-down limit, many files, an error -- returns
    None and Ray's listing runs as before.
    """
    try:
        import pyarrow as pa
        from ray.data._internal.datasource_v2.common.listing_utils import (
            list_files_for_each_block,
            partition_files,
        )
        from ray.data._internal.datasource_v2.common.non_sampling_file_indexer import (
            NonSamplingFileIndexer,
        )
        from ray.data._internal.datasource_v2.formats.parquet import footer_file_indexer as ffi
        from ray.data._internal.datasource_v2.formats.parquet.footer_reader import FooterReader
        from ray.data._internal.datasource_v2.interfaces.file_manifest import PATH_COLUMN_NAME
        from ray.data._internal.execution.interfaces import TaskContext
        from ray.data.block import BlockAccessor
    except ImportError:
        return None
    indexer = op.file_indexer
    if type(indexer) not in (ffi.FooterFileIndexer, NonSamplingFileIndexer) or op.limit is not None:
        return None

    class _Local(type(indexer)):  # type: ignore[misc, valid-type]
        """The indexer, with its footer reads made here (``list_files`` of Ray's
        FooterFileIndexer minus the actor pool; the rest is Ray's)."""

        def _iter_file_infos_for_list(self, *args: Any, **kwargs: Any) -> Any:
            files = list(super()._iter_file_infos_for_list(*args, **kwargs))
            if len(files) > LOCAL_LISTING_MAX_FILES:
                raise _TooManyFiles
            return iter(files)

        def list_files(self, paths: Any, **kw: Any) -> Any:
            if not isinstance(indexer, ffi.FooterFileIndexer):
                yield from super().list_files(paths, **kw)
                return
            infos = self._iter_file_infos_for_list(
                paths,
                **{k: kw.get(k) for k in ("filesystem", "pruners", "shuffle_config")},
                preserve_order=kw.get("preserve_order", False),
                execution_idx=kw.get("execution_idx", 0),
                excluded_read_unit_ids=kw.get("excluded_read_unit_ids"),
            )
            # io_concurrency: the reader sets Arrow's process-wide IO thread count to it;
            # passing the current count leaves this process's setting as it was.
            reader = FooterReader(
                kw.get("filesystem"),
                pa.io_thread_count(),
                kw.get("predicate"),
                kw.get("projected_columns"),
                self._coalesce_bytes,
                excluded_read_unit_ids=kw.get("excluded_read_unit_ids"),
            )
            try:
                for batch in self._batches(infos):
                    for chunks in reader.read_footers(batch, preserve_order=True):
                        for file_chunks in chunks:
                            yield ffi._file_chunks_to_manifest(file_chunks)
            finally:
                reader.pool.shutdown(wait=True)

    try:
        local = copy.deepcopy(indexer)
        local.__class__ = _Local
        ctx = TaskContext(task_idx=0, op_name="ListFiles")
        blocks: Any = list_files_for_each_block(
            [pa.table({PATH_COLUMN_NAME: list(op.paths)})],
            ctx,
            indexer=local,
            filesystem=op.filesystem,
            file_extensions=op.file_extensions,
            partition_filter=op.partition_filter,
            partition_pruner=op.partition_pruner,
            preserve_order=ds.context.execution_options.preserve_order,
            predicate=op.predicate,
            limit=None,
            projected_columns=op.projected_columns,
            shuffle_config=None,
        )
        if op.file_partitioner is not None:
            blocks = partition_files(blocks, ctx, partitioner=copy.deepcopy(op.file_partitioner))
        out = []
        for block in blocks:
            acc = BlockAccessor.for_block(block)
            out.append((block, acc.get_metadata(), acc.schema()))
        return out
    except _TooManyFiles:
        return None
    except Exception:  # noqa: BLE001 - an optimization: Ray's own listing still works
        logger.warning("torch_raydata: listing the files in process failed", exc_info=True)
        return None


class _TooManyFiles(Exception):
    pass


# Read units per cluster CPU that a listing is split to (see read_units).
READ_UNITS_PER_CPU = 2
# A read unit is split only while each half keeps at least this many bytes of files
# (``__file_size``): below it, a task's fixed cost (scheduling, a worker's task setup, an
# object-store put per unit) outweighs the parallel work. Measured on the digits demo
# (four 23 KB files per split): four units instead of one made the 10-epoch fit 6.3-6.4 s
# against 5.6-5.7 s.
MIN_SPLIT_BYTES = 1 << 20


def read_units(ds: Dataset, listing_op: Any) -> tuple[int, int]:
    """How many read tasks an epoch of ``ds`` should have at least, and the fewest file
    bytes a split unit may keep.

    Ray 2.60 packs a ``read_parquet`` listing into read units of up to 128 MiB of
    *stored* bytes, and ignores ``override_num_blocks`` for it (its parquet partitioner
    drops the hint). A map fused into the read then runs in as many tasks as there are
    units: 6 files of JPEGs (~18 MB) made ONE task, so one CPU decoded every image of
    the epoch while the others idled (benchmark W7: Ray workers 1.03 cores busy of 2).
    The count: the user's ``override_num_blocks`` when given (split down to one listing
    row per unit if need be), else ``READ_UNITS_PER_CPU`` per CPU of the cluster (two,
    so that a unit that runs long does not leave a CPU idle at the epoch's end) while a
    unit keeps ``MIN_SPLIT_BYTES``."""
    from ray.data._internal.logical.operators import ReadFiles

    for op in ds._logical_plan.dag.post_order_iter():
        if isinstance(op, ReadFiles) and listing_op in op.input_dependencies:
            if op.parallelism and op.parallelism > 0:
                return int(op.parallelism), 0
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
    except Exception:  # noqa: BLE001 - unknown: leave Ray's units as they are
        return 0, 0
    return READ_UNITS_PER_CPU * cpus, MIN_SPLIT_BYTES


def _file_bytes(table: Any) -> float:
    """Bytes of files a listing unit reads (inf when the listing has no size column: any
    unit may then be split)."""
    from ray.data._internal.datasource_v2.interfaces.file_manifest import FILE_SIZE_COLUMN_NAME

    if FILE_SIZE_COLUMN_NAME not in table.column_names:
        return float("inf")
    import pyarrow.compute as pc

    return float(pc.sum(table.column(FILE_SIZE_COLUMN_NAME)).as_py() or 0)


def split_listing(
    listing: list[tuple[Any, Any, Any]], units: int, min_bytes: int = 0
) -> list[tuple[Any, Any, Any]]:
    """``listing`` (manifest tables, one per read unit) with its largest units (by file
    bytes) split in halves, in place (the order of files is kept), until there are
    ``units`` of them, or every unit is one listing row (a file, or a run of a file's row
    groups, which Ray's packer also places on its own), or splitting would leave a unit
    under ``min_bytes`` of files on average. Never merges units. Hand-written: Ray's
    packer offers no unit count (only a byte cap)."""
    from ray.data.block import BlockAccessor

    out = list(listing)
    sizes = [_file_bytes(t) for t, _, _ in out]  # kept beside ``out``: one sum per unit
    while len(out) < units:
        splittable = [
            k for k in range(len(out)) if out[k][0].num_rows >= 2 and sizes[k] >= 2 * min_bytes
        ]
        if not splittable:
            break
        i = max(splittable, key=lambda k: (sizes[k], out[k][0].num_rows))
        table, _md, schema = out[i]
        half = table.num_rows // 2
        pieces = [table.slice(0, half), table.slice(half)]
        out[i : i + 1] = [(p, BlockAccessor.for_block(p).get_metadata(), schema) for p in pieces]
        sizes[i : i + 1] = [_file_bytes(p) for p in pieces]
    return out


# Dataset.add_column's batch function: it returns its input batch with one column set,
# so it keeps every row (or fails), though Ray marks its map_batches as row-changing.
_ADD_COLUMN = ("ray.data.dataset", "Dataset.add_column.<locals>.add_column")


def rows_of_listing(ds: Dataset, listing: list[tuple[Any, Any, Any]]) -> int | None:
    """Rows one epoch of ``ds`` yields, exact, from its file listing; None unless sure.

    Sure only when the plan is a chain: ``ListFiles`` (no predicate, no limit) ->
    ``ReadFiles`` of parquet (no predicate, partition predicate or limit in its scanner,
    no block function) -> operators that keep every row: those Ray itself marks
    ``can_modify_num_rows=False`` (``map``, ``select_columns``, ``drop_columns``,
    ``rename_columns``, ``with_column``, ``map_batches(udf_modifying_row_count=False)``;
    the marks Ray's own ``count()`` relies on) and ``add_column``, with no pushed-down
    per-block limit. Then the epoch reads exactly the listed row groups, whose footer row
    counts the listing carries (each chunk ``fully_matched``). Anything else --
    ``filter``, ``map_batches``, ``flat_map``, ``limit``, another format, a listing
    without row counts -- gives None.
    """
    try:
        from ray.data._internal.datasource_v2.formats.parquet.parquet_scanner import (
            ParquetScanner,
        )
        from ray.data._internal.datasource_v2.interfaces.file_manifest import (
            FILE_CHUNK_METADATA_COLUMN_NAME,
        )
        from ray.data._internal.logical.operators import ListFiles, ReadFiles
        from ray.data._internal.logical.operators.one_to_one_operator import AbstractOneToOne

        op = ds._logical_plan.dag
        while not isinstance(op, ReadFiles):
            if not isinstance(op, AbstractOneToOne) or not _keeps_rows(op):
                return None
            (op,) = op.input_dependencies
        scanner = op.scanner
        if type(scanner) is not ParquetScanner or op.block_udf is not None or any(
            getattr(scanner, a) is not None for a in ("predicate", "partition_predicate", "limit")
        ):
            return None
        (listing_op,) = op.input_dependencies
        if type(listing_op) is not ListFiles or listing_op.predicate is not None:
            return None
        if listing_op.limit is not None:
            return None
        rows = 0
        for table, _md, _schema in listing:
            for chunk in table.column(FILE_CHUNK_METADATA_COLUMN_NAME).to_pylist():
                if not chunk or chunk.get("num_rows") is None or not chunk.get("fully_matched"):
                    return None
                rows += int(chunk["num_rows"])
        return rows
    except Exception:  # noqa: BLE001 - a plan or listing of another shape: not sure
        return None


def _keeps_rows(op: Any) -> bool:
    if getattr(op, "per_block_limit", None) is not None:
        return False
    if not op.can_modify_num_rows:
        return True
    fn = getattr(op, "fn", None)
    return type(op).__name__ == "MapBatches" and (
        getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    ) == _ADD_COLUMN
