"""Workload 5 (parquet on local disk) and the parquet layout probe.

Owns: writing the images of workload 1 as parquet in a chosen layout, reading them back
with ``ray.data.read_parquet`` (v1 or v2 reader), and timing how fast each layout reads
and decodes. The images, ids and the ``Workload`` record come from ``workloads.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.collate_fn import ArrowBatchCollateFn

from . import collates
from .collates import IMAGE_SHAPE
from .workloads import Workload, bounds, images

__all__ = ["PARQUET_LAYOUTS", "parquet_workload", "probe_parquet_layouts"]

ROW_BYTES = int(np.prod(IMAGE_SHAPE))


class RayArrowImageCollate(ArrowBatchCollateFn):
    def __call__(self, batch: pa.Table) -> dict:
        return collates.arrow_image_collate(batch)


def _image_array(image: np.ndarray, layout: str) -> pa.Array:
    n = len(image)
    data = pa.py_buffer(np.ascontiguousarray(image).reshape(-1))
    flat = pa.Array.from_buffers(pa.uint8(), n * ROW_BYTES, [None, data])
    if layout == "fixed_size_binary":
        return pa.Array.from_buffers(pa.binary(ROW_BYTES), n, [None, data])
    if layout == "binary":
        offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32) * ROW_BYTES)
        return pa.Array.from_buffers(pa.binary(), n, [None, offsets, data])
    if layout == "fixed_size_list":
        return pa.FixedSizeListArray.from_arrays(flat, ROW_BYTES)
    if layout == "large_list":
        return pa.LargeListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int64) * ROW_BYTES), flat
        )
    raise ValueError(f"{layout=} must be one of {PARQUET_LAYOUTS}")


PARQUET_LAYOUTS = ("fixed_size_binary", "binary", "fixed_size_list", "large_list")


def _write_parquet(
    path: str, image: np.ndarray, label: np.ndarray, layout: str, compression: str
) -> None:
    table = pa.table({"image": _image_array(image, layout), "label": label})
    pq.write_table(
        table, path, compression=compression, use_dictionary=False, write_statistics=False
    )


def _decode(table: pa.Table, layout: str) -> np.ndarray:
    if layout.endswith("binary"):
        return collates.decode_image_column(table.column("image")).numpy()
    col = table.column("image").combine_chunks()
    return col.values.to_numpy().reshape(len(col), *IMAGE_SHAPE)


def probe_parquet_layouts(rows: int = 2000, repeats: int = 3) -> list[dict[str, Any]]:
    """Write `rows` images in each layout x compression; time pq.read_table + decode to a
    (rows, 3, 64, 64) array (best of `repeats`, warm page cache)."""
    image, label = images(rows, seed=2)
    tmp = tempfile.mkdtemp(prefix="trd-bench-probe-")
    out = []
    try:
        for compression in ("none", "snappy"):
            for layout in PARQUET_LAYOUTS:
                path = os.path.join(tmp, f"{layout}-{compression}.parquet")
                _write_parquet(path, image, label, layout, compression)
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    decoded = _decode(pq.read_table(path), layout)
                    best = min(best, time.perf_counter() - t0)
                assert np.array_equal(decoded, image), layout
                out.append(
                    {
                        "layout": layout,
                        "compression": compression,
                        "file_mb": os.path.getsize(path) / 2**20,
                        "rows_per_s": rows / best,
                        "gb_per_s": image.nbytes / best / 1e9,
                    }
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_parquet(path: str, reader: str) -> Any:
    """``reader`` "v2": Ray 2.60's default DataSourceV2 path, which starts FooterReader
    actors to list files on EVERY execution (seconds per epoch here); "v1": the classic
    datasource, which reads the footers once when the Dataset is built."""
    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = reader == "v2"
    try:
        return ray.data.read_parquet(path)
    finally:
        ctx.use_datasource_v2 = previous


def parquet_workload(base: Workload, blocks: int, layout: str, reader: str) -> Workload:
    tmp = tempfile.mkdtemp(prefix="trd-bench-parquet-")
    image, label = base.columns["image"], base.columns["label"]
    for i, (a, b) in enumerate(bounds(len(label), blocks)):
        _write_parquet(
            os.path.join(tmp, f"part-{i:03d}.parquet"), image[a:b], label[a:b], layout, "none"
        )
    list_layout = layout.endswith("list")
    return Workload(
        key="parquet",
        title=f"5. parquet on local disk ({layout}, uncompressed), read_parquet ({reader}) every epoch",
        dataset=_read_parquet(tmp, reader),
        columns=base.columns,
        id_column=base.id_column,
        mutate_column=base.mutate_column,
        source_bytes=base.source_bytes,
        trd_collate=None if list_layout else collates.arrow_image_collate,
        ray_collate=None if list_layout else RayArrowImageCollate(),
        numpy_collate=None if list_layout else collates.numpy_image_collate,
        recomputed=True,
        notes=[
            f"{blocks} files in a tmp dir (warm page cache); layout chosen by the probe below",
            "trd and iter_torch_batches run the SAME Arrow decode (binary buffer -> one copy "
            "into a (B,3,64,64) tensor); iter_batches(numpy) gets Ray's object array of bytes "
            "and joins it once; DataLoader competitors read the decoded images from memory "
            "(no streaming parquet reader)",
        ],
        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
    )
