"""The five benchmark workloads, generated locally (no downloads).

Owns: the data (seeded numpy), the Ray Dataset each workload streams, the equivalent
in-memory columns for the DataLoader and memcpy competitors, and which collate each
competitor family uses there (fairness). Also the parquet layout probe. Does not own
how competitors iterate (``competitors.py``) or what is measured (``measure.py``).

    fixed     20k rows uint8 (3,64,64) + int64 label, materialized in the object store
    streamed  the same through a map_batches preprocessing step (re-executed every epoch)
    tokens    variable-length int32 sequences (16..512), PadCollate vs numpy padding
    consumer  `fixed` with a training step of 5 ms per batch (time.sleep: GIL and core free)
    parquet   the images on local disk, read by ray.data.read_parquet every epoch (parquet.py)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

import torch_raydata as trd

from . import collates
from .collates import IMAGE_SHAPE

__all__ = ["Workload", "WORKLOADS", "build_workload", "images", "bounds"]


@dataclass
class Workload:
    key: str
    title: str
    dataset: Any  # ray.data.Dataset streamed by torch_raydata and the Ray competitors
    columns: dict[str, np.ndarray]  # the same rows in memory (DataLoader, memcpy)
    id_column: str  # unique int per row (the ownership check finds rows by it)
    mutate_column: str  # the tensor the ownership check writes into
    source_bytes: int  # bytes of the rows as stored: what the memcpy limit copies
    trd_collate: Callable | None = None  # None: trd.collate.DefaultCollate()
    ray_collate: Any = None  # iter_torch_batches(collate_fn=...); None: Ray's default
    numpy_collate: Callable | None = None  # iter_batches(numpy) -> torch; None: from_numpy
    dl_collate: Callable | None = None  # DataLoader collate_fn; None: default_collate
    item_transform: Callable | None = None  # DataLoader per-item equivalent of map_batches
    consumer_ms: float = 0.0
    shuffle_rows: int | None = None  # a local shuffle buffer of this many rows (every loader)
    recomputed: bool = False  # Ray re-executes it every epoch: an in-place write cannot leak
    notes: list[str] = field(default_factory=list)
    cleanup: Callable[[], None] | None = None


# -- module-level callables (DataLoader workers and Ray tasks must reach them) ------------------
def invert(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `streamed` preprocessing step: one full pass over the pixels (255 - x)."""
    return {**batch, "image": 255 - batch["image"]}


def invert_item(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "image": 255 - item["image"]}


def dl_pad_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    tokens, mask = collates.pad_items([it["tokens"] for it in items])
    ids = torch.as_tensor(np.fromiter((it["id"] for it in items), np.int64, len(items)))
    return {"id": ids, "tokens": tokens, "tokens_mask": mask}


class RayArrowPadCollate(ArrowBatchCollateFn):
    def __call__(self, batch: pa.Table) -> dict:
        return collates.arrow_pad_collate(batch)


# -- data --------------------------------------------------------------------------------
def images(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (rows, *IMAGE_SHAPE), dtype=np.uint8), np.arange(
        rows, dtype=np.int64
    )


def bounds(rows: int, blocks: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, rows, max(1, min(blocks, rows)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _fixed(rows: int, blocks: int) -> Workload:
    from ray.data.extensions import ArrowTensorArray

    image, label = images(rows)
    tables = [
        pa.table({"image": ArrowTensorArray.from_numpy(image[a:b]), "label": label[a:b]})
        for a, b in bounds(rows, blocks)
    ]
    ds = ray.data.from_arrow(tables).materialize()  # blocks already in the object store
    return Workload(
        key="fixed",
        title=f"1. fixed-shape: {rows:,} rows uint8 {IMAGE_SHAPE} + int64, materialized",
        dataset=ds,
        columns={"image": image, "label": label},
        id_column="label",
        mutate_column="image",
        source_bytes=image.nbytes + label.nbytes,
        notes=[f"{len(tables)} blocks of ~{rows // len(tables)} rows (Ray tensor extension type)"],
    )


def _streamed(base: Workload) -> Workload:
    ds = base.dataset.map_batches(invert, batch_format="numpy", zero_copy_batch=True)
    return Workload(
        key="streamed",
        title="2. the same through map_batches(255 - image), streamed (not materialized)",
        dataset=ds,
        columns=base.columns,
        id_column=base.id_column,
        mutate_column=base.mutate_column,
        source_bytes=base.source_bytes,
        item_transform=invert_item,
        recomputed=True,
        notes=[
            "map_batches runs in Ray worker processes every epoch (on the same 2 cores)",
            "DataLoader competitors apply the same 255 - image per item in __getitem__",
        ],
    )


def _tokens(rows: int, blocks: int, seed: int = 1) -> Workload:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 513, rows)
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(1, 32000, int(offsets[-1]), dtype=np.int32)
    ids = np.arange(rows, dtype=np.int64)
    tables = []
    for a, b in bounds(rows, blocks):
        off = pa.array(offsets[a : b + 1] - offsets[a])
        tok = pa.ListArray.from_arrays(off, pa.array(values[offsets[a] : offsets[b]]))
        tables.append(pa.table({"id": ids[a:b], "tokens": tok}))
    seqs = np.empty(rows, dtype=object)
    seqs[:] = [values[offsets[i] : offsets[i + 1]] for i in range(rows)]
    return Workload(
        key="tokens",
        title=f"3. variable-length int32 tokens ({rows:,} rows, lengths 16..512), padded",
        dataset=ray.data.from_arrow(tables).materialize(),
        columns={"id": ids, "tokens": seqs},
        id_column="id",
        mutate_column="tokens",
        source_bytes=values.nbytes + offsets.nbytes + ids.nbytes,
        trd_collate=trd.collate.PadCollate(columns=["tokens"]),
        ray_collate=RayArrowPadCollate(),
        numpy_collate=collates.numpy_pad_collate,
        dl_collate=dl_pad_collate,
        notes=[
            "trd: PadCollate(columns=['tokens']); iter_torch_batches: an ArrowBatchCollateFn "
            "padding straight from the Arrow offsets; iter_batches(numpy): the same vectorised "
            "numpy padding over Ray's object array; DataLoader: the same over its items",
            "memcpy limit copies the stored bytes (values + offsets + id), not the padded output",
        ],
    )


def _variant_of_fixed(base: Workload, **changes: Any) -> Workload:
    """``fixed``'s data and competitors' inputs, with another key, title, step or shuffle."""
    return replace(base, cleanup=None, **changes)


def _consumer(base: Workload, step_ms: float) -> Workload:
    return _variant_of_fixed(
        base,
        key="consumer",
        title=f"4. `fixed` with a {step_ms:g} ms training step per batch (time.sleep)",
        consumer_ms=step_ms,
        notes=[
            "the step sleeps (a GPU-bound step: frees the GIL and the core); "
            "wait = from the step's end to the next batch in hand (next() and the previous batch's release), the metric here"
        ],
    )


def _shuffled(base: Workload, buffer_rows: int) -> Workload:
    return _variant_of_fixed(
        base,
        key="shuffled",
        title=f"6. `fixed` with a local shuffle buffer of {buffer_rows:,} rows",
        shuffle_rows=buffer_rows,
        notes=[
            f"trd shuffle_buffer_size={buffer_rows}; Ray local_shuffle_buffer_size={buffer_rows};"
            " DataLoader shuffle=True (a global permutation); memcpy gathers rows in a random"
            " order"
        ],
    )


WORKLOADS = ("fixed", "streamed", "tokens", "consumer", "parquet", "shuffled")


def build_workload(
    key: str,
    rows: int,
    blocks: int,
    cache: dict[str, Workload],
    *,
    step_ms: float = 5.0,
    parquet_layout: str = "fixed_size_binary",
    parquet_reader: str = "v1",
) -> Workload:
    """Build (or reuse from ``cache``) workload ``key``; ``fixed`` is shared by several."""
    if key in cache:
        return cache[key]
    if key == "fixed":
        wl = _fixed(rows, blocks)
    elif key == "streamed":
        wl = _streamed(build_workload("fixed", rows, blocks, cache))
    elif key == "tokens":
        wl = _tokens(rows, blocks)
    elif key == "shuffled":
        wl = _shuffled(build_workload("fixed", rows, blocks, cache), 2048)
    elif key == "consumer":
        wl = _consumer(build_workload("fixed", rows, blocks, cache), step_ms)
    elif key == "parquet":
        from .parquet import parquet_workload

        wl = parquet_workload(
            build_workload("fixed", rows, blocks, cache), blocks, parquet_layout, parquet_reader
        )
    else:
        raise ValueError(f"workload {key!r} is not one of {WORKLOADS}")
    cache[key] = wl
    return wl
