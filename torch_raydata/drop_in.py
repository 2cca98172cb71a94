"""``iter_torch_batches``: Ray 2.60's ``iter_torch_batches`` keywords and meaning, on our pipeline.

Owns: turning Ray's keywords into :class:`~torch_raydata.RayIterableDataset` options, Ray's
``collate_fn`` contract (a plain callable or a ``NumpyBatchCollateFn`` gets
``Dict[str, np.ndarray]``, an ``ArrowBatchCollateFn`` a ``pyarrow.Table``, a
``PandasBatchCollateFn`` a ``pandas.DataFrame``), ``device="auto"`` (the Ray Train
worker's device), Arrow null-type columns as NaN, and the re-iterable it returns.

Does not own the pipeline (``dataset.py`` and ``pipeline/``): every batch goes through the
same six stages as ``RayIterableDataset``; finding the Ray Train device is stage 1's
(``pipeline/source.py``, the one module touching Ray internals).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ._checks import check_int
from .collate import DefaultCollate, PadCollate
from .dataset import RayIterableDataset
from .distributed import world
from .pipeline.source import ray_train_device
from .pipeline.stats import LoaderStats

__all__ = ["TorchBatches", "iter_torch_batches"]

_DEFAULT_THREADS = 4  # Ray's format/collate pool: min(4, prefetch_batches) threads


class TorchBatches:
    """What :func:`iter_torch_batches` returns: an iterable over batches, each ``iter()``
    one epoch (as Ray's). One epoch runs at a time (see ``RayIterableDataset``).

    Attributes:
        dataset: the ``RayIterableDataset`` underneath (its ``stats()``, ``state_dict()``,
            ``set_epoch()``...).
    """

    def __init__(self, dataset: RayIterableDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[Any]:
        return iter(self.dataset)

    def stats(self) -> LoaderStats:
        """Stats of the running (or last) epoch: rows/s, the step's wait, buffers."""
        return self.dataset.stats()

    def close(self) -> None:
        """Stop the running epoch and release everything (iterating again starts afresh)."""
        self.dataset.close()

    def __repr__(self) -> str:
        return f"TorchBatches({self.dataset!r})"


def iter_torch_batches(
    dataset_or_iterator: Any,
    *,
    prefetch_batches: int = 1,
    batch_size: int | None = 256,
    dtypes: torch.dtype | dict[str, torch.dtype] | None = None,
    device: str | torch.device = "auto",
    collate_fn: Callable[[Any], Any] | None = None,
    drop_last: bool = False,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    pin_memory: bool = False,
) -> TorchBatches:
    """``ds.iter_torch_batches(...)`` of Ray 2.60, as a one-line change:
    ``trd.iter_torch_batches(ds, ...)``. Same keywords, same batches.

    Args:
        dataset_or_iterator: a ``ray.data.Dataset`` (materialized or not) or a
            ``ray.data.DataIterator``, e.g. ``ray.train.get_dataset_shard("train")``.
            As with Ray, a Dataset is read whole by every process that iterates it
            (for a split across torch.distributed ranks use ``RayIterableDataset``).
        prefetch_batches: batches prepared ahead of the training step (0: none ahead);
            collate runs on ``min(4, prefetch_batches)`` threads, as Ray's format pool.
        batch_size: rows per batch (an int: whole-block batches, Ray's ``None``, are
            not supported).
        dtypes: one ``torch.dtype`` for every numeric column, or a dict naming some
            columns (the others keep their type). Not with ``collate_fn``.
        device: ``"auto"`` (the Ray Train worker's device inside a Ray Train worker,
            else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
        collate_fn: None (tensors per column), a callable or ``NumpyBatchCollateFn``
            (gets ``Dict[str, np.ndarray]``), an ``ArrowBatchCollateFn`` (a
            ``pyarrow.Table``) or a ``PandasBatchCollateFn`` (a ``pandas.DataFrame``).
        drop_last: drop the last batch if it has fewer than ``batch_size`` rows.
        local_shuffle_buffer_size: rows in the local shuffle buffer (None: no shuffle).
        local_shuffle_seed: the shuffle's seed; with it, epoch ``n`` has the same order
            in every run (and each epoch a different one: the seed is combined with
            the epoch number).
        pin_memory: collate into page-locked memory (needs CUDA).

    Returns:
        A :class:`TorchBatches`: iterate it once per epoch.

    Example:
        >>> for epoch in range(3):
        ...     for batch in trd.iter_torch_batches(ds, batch_size=128):   # was ds.iter_torch_batches(...)
        ...         train_step(batch)
    """
    _check_ray_input(dataset_or_iterator)
    if collate_fn is not None and dtypes is not None:
        raise ValueError(
            "collate_fn cannot be used with dtypes: convert the tensors to the dtypes you "
            "want inside collate_fn (as in Ray's iter_torch_batches)"
        )
    if batch_size is None:
        raise ValueError(
            "batch_size=None (each Ray block as one batch) is not supported by "
            "torch_raydata.iter_torch_batches: pass the rows per batch as an int"
        )
    prefetch = check_int("prefetch_batches", prefetch_batches, 0)
    if not isinstance(pin_memory, (bool, np.bool_)):
        raise ValueError(f"{pin_memory=} must be True or False")
    if pin_memory and not torch.cuda.is_available():
        raise ValueError(
            "pin_memory=True needs CUDA (page-locked memory is for copies to a GPU), and "
            "CUDA is not available in this process; pass pin_memory=False"
        )
    if isinstance(device, str) and device == "auto":
        device = ray_train_device() or torch.device("cpu")
    data = dataset_or_iterator
    if world()[1] > 1 and _is_dataset(data):
        data = data.iterator()  # Ray's meaning: every process reads the whole Dataset
    user_collate = _ray_collate(collate_fn) if collate_fn is not None else None
    ds = RayIterableDataset(
        data,
        batch_size=batch_size,
        collate_fn=user_collate,
        num_workers=max(1, min(_DEFAULT_THREADS, prefetch)),
        prefetch_batches=max(1, prefetch),
        drop_last=drop_last,
        shuffle_buffer_size=local_shuffle_buffer_size,
        shuffle_seed=local_shuffle_seed,
        device=device,
    )
    # Ray yields batches in the order of its block stream; so do we (stage 5 restores it
    # after the collate threads). Ray's executor keeps its own block order unless the
    # Dataset's DataContext asks to preserve it: untouched here too.
    ds.config = dataclasses.replace(ds.config, preserve_order=True)
    if user_collate is None:
        default = ds.collate_fn
        allocator = default.allocator if isinstance(default, DefaultCollate) else None
        if pin_memory and ds.device.type == "cpu":
            allocator = _pinned_empty  # collate straight into page-locked memory
        ds.collate_fn = _RayDefaultCollate(dtypes, allocator=allocator)
        names = ds._source.column_names()
        if names is not None:
            ds.collate_fn.check_columns(names)  # dtypes naming a missing column: fail now
    elif pin_memory:
        ds.collate_fn = _PinOutput(user_collate)
    return TorchBatches(ds)


# -- collate -----------------------------------------------------------------------------------
class _RayDefaultCollate(DefaultCollate):
    """``DefaultCollate`` plus two of Ray's rules ``DefaultCollate`` alone refuses:

    * Arrow's null type (a column holding no value): a float32 tensor of NaN per row;
    * a variable-length list column of numbers whose rows in this batch all have the
      same length (e.g. ``from_items`` of equal-length lists): a 2-D tensor. Ragged rows
      still raise, naming ``PadCollate`` (Ray fails there too).
    """

    def collate_column(self, name: str, column: pa.ChunkedArray) -> torch.Tensor | list:
        if pa.types.is_null(column.type):
            return torch.full((len(column),), float("nan"), dtype=self._cast(name) or torch.float32)
        typ = column.type
        if (
            pa.types.is_list(typ) or pa.types.is_large_list(typ)
        ) and _is_number(typ.value_type):
            out = self._equal_lists(name, column)
            if out is not None:
                return out
        return super().collate_column(name, column)

    def _cast(self, name: str) -> torch.dtype | None:
        if isinstance(self.dtypes, dict):
            return self.dtypes.get(name)
        return self.dtypes

    def _equal_lists(self, name: str, column: pa.ChunkedArray) -> torch.Tensor | None:
        """The rows as one (rows, length) tensor (one copy), or None when ragged or null."""
        arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        if arr.null_count or (len(arr) and arr.flatten().null_count):
            return None
        width = 0
        if len(arr):
            low, high = pc.min_max(pc.list_value_length(arr)).values()
            if low.as_py() != high.as_py():
                return None
            width = low.as_py()
        values = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), width)
        out = torch.from_numpy(np.array(values))  # owned: never a view of the object store
        cast = self._cast(name)
        return out.to(cast) if cast is not None else out


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class _PinOutput:
    """Ray's ``pin_memory`` for a user collate: pin its output when it is tensors."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, table: pa.Table) -> Any:
        from ray.data.collate_fn import is_tensor_batch_type
        from ray.data.util.torch_utils import pin_tensors_to_memory

        out = self.fn(table)
        return pin_tensors_to_memory(out) if is_tensor_batch_type(out) else out


class _AsFormat:
    """Ray's collate contract on our stage 4: the batch's Arrow table in the format the
    user's collate expects (Ray's own conversion, so tensor columns, nulls and ragged
    columns come out exactly as with Ray)."""

    def __init__(self, fn: Callable[[Any], Any], batch_format: str) -> None:
        self.fn = fn
        self.batch_format = batch_format

    def __call__(self, table: pa.Table) -> Any:
        from ray.data.block import BlockAccessor

        return self.fn(BlockAccessor.for_block(table).to_batch_format(self.batch_format))

    def __repr__(self) -> str:
        return f"{self.fn!r} (batch_format={self.batch_format!r})"


def _ray_collate(collate_fn: Any) -> Callable[[pa.Table], Any]:
    """Our ``pyarrow.Table -> batch`` collate for a collate_fn written for Ray."""
    from ray.data.collate_fn import (
        ArrowBatchCollateFn,
        NumpyBatchCollateFn,
        PandasBatchCollateFn,
    )

    if isinstance(collate_fn, (ArrowBatchCollateFn, DefaultCollate, PadCollate)):
        return collate_fn  # these take the batch's pyarrow.Table
    if isinstance(collate_fn, PandasBatchCollateFn):
        return _AsFormat(collate_fn, "pandas")
    if isinstance(collate_fn, NumpyBatchCollateFn) or callable(collate_fn):
        return _AsFormat(collate_fn, "numpy")
    raise ValueError(
        f"collate_fn={collate_fn!r} is not callable: pass a function of Dict[str, np.ndarray], "
        "or an instance of ray.data.collate_fn.ArrowBatchCollateFn / NumpyBatchCollateFn / "
        "PandasBatchCollateFn"
    )


def _is_dataset(obj: Any) -> bool:
    from ray.data import Dataset

    return isinstance(obj, Dataset)


def _check_ray_input(obj: Any) -> None:
    from ray.data import DataIterator, Dataset

    if not isinstance(obj, (Dataset, DataIterator)):
        raise TypeError(
            f"iter_torch_batches needs a ray.data.Dataset or ray.data.DataIterator, got "
            f"{type(obj).__module__}.{type(obj).__name__}; e.g. ray.data.read_parquet(...) "
            "or ray.train.get_dataset_shard('train')"
        )
