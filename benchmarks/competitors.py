"""The competitors: one object each, all driven the same way by ``measure.py``.

Owns: how each loader is built for a workload and what one epoch / one cold start is.
Every competitor yields ``dict[str, tensor-or-array]`` batches of ``BATCH_SIZE`` rows.

    trd          torch_raydata.RayIterableDataset, default settings
    trd_best     torch_raydata.RayIterableDataset(num_workers=2, prefetch_batches=8)
    ray_torch    ds.iter_torch_batches(batch_size, prefetch_batches)
    ray_numpy    ds.iter_batches(batch_format="numpy") + torch.from_numpy per column
    dl0 / dl2    torch DataLoader over an in-memory map-style dataset, num_workers=0 / 2
    memcpy       the physical limit: np.copyto of the same bytes into a fresh buffer per batch
    floor        no loader (step tax only): arrays cut before the loop, wrapped in fresh
                 tensors per batch; its (a) and (b) are this host's own noise
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import torch_raydata as trd
from torch_raydata.pipeline.constants import usable_cpus

from .workloads import Workload

__all__ = [
    "BATCH_SIZE",
    "COMPETITORS",
    "KNOWN",
    "LABELS",
    "OPT_IN",
    "STEP_TAX_ONLY",
    "make_competitor",
]

BATCH_SIZE = 256
RAY_PREFETCH = 4  # Ray's default is 1; 4 matches trd's default (docs/performance.md: the sweep)
TRD_BEST = {"num_workers": 2, "prefetch_batches": 8}

LABELS = {
    "trd": f"trd RayIterableDataset (default: 1 -> {min(4, usable_cpus())} threads as needed, p4)",
    "trd_best": "trd RayIterableDataset (best: w{num_workers} p{prefetch_batches})".format(
        **TRD_BEST
    ),
    "ray_torch": f"ray iter_torch_batches (prefetch {RAY_PREFETCH})",
    "ray_numpy": f"ray iter_batches(numpy) + from_numpy (prefetch {RAY_PREFETCH})",
    "dl0": "torch DataLoader num_workers=0",
    "dl2": "torch DataLoader num_workers=2",
    "memcpy": "memcpy limit (numpy copy, same bytes)",
    "trd_shm": "trd RayIterableDataset(transport='shm') (2 collate actors on this node)",
    "floor": "no loader: arrays cut before the loop, fresh tensors per batch (the floor)",
}
#: Run only when named (``--competitors``): the shm transport's actors take two of these
#: machines' two cores' worth of processes, and it is an opt-in transport.
OPT_IN = ("trd_shm",)
#: Measured by the step tax only (rows/s of a list is no loader's).
STEP_TAX_ONLY = ("floor",)
COMPETITORS = tuple(k for k in LABELS if k not in OPT_IN + STEP_TAX_ONLY)
KNOWN = tuple(LABELS)


class Competitor:
    key = ""
    extra_keys: tuple[str, ...] = ()

    def __init__(self, wl: Workload) -> None:
        self.wl = wl

    def epoch(self) -> Iterator[Any]:
        """One epoch on the long-lived (warm) loader."""
        raise NotImplementedError

    def cold(self) -> Iterator[Any]:
        """An iterator on a freshly built loader (time to first batch)."""
        return self.epoch()

    def end(self, it: Iterator[Any]) -> None:
        """Release an iterator that was not run to the end."""
        close = getattr(it, "close", None)
        if close is not None:
            close()

    def extra(self) -> dict[str, Any]:
        """Competitor-specific metrics of the epoch that just ended."""
        return {}

    def close(self) -> None:
        pass


class Trd(Competitor):
    def __init__(self, wl: Workload, key: str, **options: Any) -> None:
        super().__init__(wl)
        self.key, self.options = key, options
        self.ds = self._build()
        self._cold: trd.RayIterableDataset | None = None

    def _build(self) -> trd.RayIterableDataset:
        shuffle = (
            {"shuffle_buffer_size": self.wl.shuffle_rows, "shuffle_seed": 0}
            if self.wl.shuffle_rows
            else {}
        )
        return trd.RayIterableDataset(
            self.wl.dataset,
            batch_size=BATCH_SIZE,
            collate_fn=self.wl.trd_collate,
            **shuffle,
            **self.options,
        )

    def epoch(self) -> Iterator[Any]:
        return iter(self.ds)

    def cold(self) -> Iterator[Any]:
        self._cold = self._build()
        return iter(self._cold)

    def end(self, it: Iterator[Any]) -> None:
        super().end(it)
        if self._cold is not None:
            self._cold.close()
            self._cold = None

    def extra(self) -> dict[str, Any]:
        s = self.ds.stats()
        return {
            "peak_buffered_batches": s.peak_buffered_batches,
            "peak_buffered_bytes": s.peak_buffered_bytes,
            "trd_wait_p95_ms": s.wait_p95_ms,
            "trd_stage_seconds": s.stage_seconds,
        }

    def close(self) -> None:
        self.ds.close()


class RayTorch(Competitor):
    key = "ray_torch"

    def __init__(self, wl: Workload, prefetch_batches: int = RAY_PREFETCH) -> None:
        super().__init__(wl)
        self.prefetch_batches = prefetch_batches

    def epoch(self) -> Iterator[Any]:
        return iter(
            self.wl.dataset.iter_torch_batches(
                batch_size=BATCH_SIZE,
                prefetch_batches=self.prefetch_batches,
                collate_fn=self.wl.ray_collate,
                local_shuffle_buffer_size=self.wl.shuffle_rows,
            )
        )


def _from_numpy(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


class RayNumpy(Competitor):
    key = "ray_numpy"

    def epoch(self) -> Iterator[Any]:
        inner = iter(
            self.wl.dataset.iter_batches(
                batch_size=BATCH_SIZE,
                prefetch_batches=RAY_PREFETCH,
                batch_format="numpy",
                local_shuffle_buffer_size=self.wl.shuffle_rows,
            )
        )
        return _convert(inner, self.wl.numpy_collate or _from_numpy)


def _convert(inner: Iterator[Any], fn: Any) -> Iterator[Any]:
    try:
        for batch in inner:
            yield fn(batch)
    finally:
        close = getattr(inner, "close", None)
        if close is not None:
            close()


class InMemoryDataset(Dataset):
    """Map-style: row i of every column (ragged columns are object arrays of arrays)."""

    def __init__(self, columns: dict[str, np.ndarray], transform: Any = None) -> None:
        self.columns = columns
        self.transform = transform
        self._n = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.columns.items()}
        return self.transform(item) if self.transform is not None else item


class TorchDataLoader(Competitor):
    def __init__(self, wl: Workload, key: str, num_workers: int) -> None:
        super().__init__(wl)
        self.key, self.num_workers = key, num_workers
        self.loader = self._build()

    def _build(self) -> DataLoader:
        kwargs: dict[str, Any] = {}
        if self.wl.dl_collate is not None:
            kwargs["collate_fn"] = self.wl.dl_collate
        return DataLoader(
            InMemoryDataset(self.wl.columns, self.wl.item_transform),
            batch_size=BATCH_SIZE,
            num_workers=self.num_workers,
            # Workers stay up across epochs (no fork per epoch in the timed loop); the cold
            # start, forks included, is what time-to-first-batch measures.
            persistent_workers=self.num_workers > 0,
            shuffle=bool(self.wl.shuffle_rows),
            **kwargs,
        )

    def epoch(self) -> Iterator[Any]:
        return iter(self.loader)

    def cold(self) -> Iterator[Any]:
        self._cold = self._build()
        return iter(self._cold)

    def end(self, it: Any) -> None:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._cold = None

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None


class Floor(Competitor):
    """No loader: the least any loader does per batch. Every batch's arrays are cut before
    the loop; each ``next()`` wraps them in fresh tensors (``torch.from_numpy``, no copy)
    and the loop's rebinding frees the previous ones. Under the step tax's loop its (a)
    and (b) are what this host does to a loop with no loader work at all (other
    processes, Ray's daemons, the vCPUs' own noise, waking from the step's sleep): the
    floor the loaders' figures stand on."""

    key = "floor"

    def __init__(self, wl: Workload) -> None:
        super().__init__(wl)
        n = len(wl.columns[wl.id_column])
        self.arrays = [
            {k: v[i : i + BATCH_SIZE] for k, v in wl.columns.items() if v.dtype != object}
            for i in range(0, n, BATCH_SIZE)
        ]

    def epoch(self) -> Iterator[Any]:
        for arrays in self.arrays:
            yield {k: torch.from_numpy(v) for k, v in arrays.items()}


class Memcpy(Competitor):
    """Per batch: copy that batch's share of every stored column into a fresh buffer."""

    key = "memcpy"

    def __init__(self, wl: Workload) -> None:
        super().__init__(wl)
        self.flat: dict[str, np.ndarray] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for name, col in wl.columns.items():
            if col.dtype == object:  # ragged: the values and offsets as stored in Arrow
                lengths = np.fromiter((len(s) for s in col), np.int64, len(col))
                self.offsets[name] = np.concatenate([[0], np.cumsum(lengths)])
                self.flat[name] = np.concatenate(list(col))
            else:
                self.flat[name] = col

    def epoch(self) -> Iterator[Any]:
        n = len(self.wl.columns[self.wl.id_column])
        order = np.random.default_rng(0).permutation(n) if self.wl.shuffle_rows else None
        for start in range(0, n, BATCH_SIZE):
            stop = min(n, start + BATCH_SIZE)
            batch = {}
            if order is not None:  # rows in a random order: a gather, still one copy
                rows = np.sort(order[start:stop])
                yield {name: col[rows] for name, col in self.flat.items()}
                continue
            for name, col in self.flat.items():
                off = self.offsets.get(name)
                src = col[start:stop] if off is None else col[off[start] : off[stop]]
                dst = np.empty_like(src)
                np.copyto(dst, src)
                batch[name] = dst
            yield batch


def make_competitor(key: str, wl: Workload) -> Competitor:
    if key == "trd":
        return Trd(wl, "trd")
    if key == "trd_best":
        return Trd(wl, "trd_best", **TRD_BEST)
    if key == "trd_shm":
        return Trd(wl, "trd_shm", transport="shm")
    if key == "ray_torch":
        return RayTorch(wl)
    if key == "ray_numpy":
        return RayNumpy(wl)
    if key in ("dl0", "dl2"):
        return TorchDataLoader(wl, key, int(key[2:]))
    if key == "memcpy":
        return Memcpy(wl)
    if key == "floor":
        return Floor(wl)
    raise ValueError(f"competitor {key!r} is not one of {KNOWN}")
