"""Collate functions that give every competitor the same last-mile work (fairness).

Owns: the numpy padding used by the Ray and DataLoader competitors of the token workload
(torch_raydata uses ``trd.collate.PadCollate`` there), and the binary-image decode used
by every streamed competitor of the parquet workload. Does not own: torch_raydata's own
collates (``torch_raydata/collate``), which are what is being measured.

Every function returns tensors that own their memory (one copy out of Arrow/numpy),
like ``trd.collate.DefaultCollate``, so no competitor gets a zero-copy discount here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

__all__ = [
    "IMAGE_SHAPE",
    "pad_ragged",
    "pad_arrow_column",
    "pad_items",
    "decode_image_column",
    "arrow_image_collate",
    "numpy_image_collate",
    "numpy_pad_collate",
    "arrow_pad_collate",
    "arrow_columns_to_torch",
]

IMAGE_SHAPE = (3, 64, 64)


# -- padding (token workload) ----------------------------------------------------------------
def pad_ragged(values: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ``values`` + per-row ``lengths`` -> (padded (B, L) tensor, bool mask), vectorised."""
    width = int(lengths.max()) if len(lengths) else 0
    out = torch.zeros((len(lengths), width), dtype=torch.from_numpy(values[:0]).dtype)
    mask = torch.from_numpy(np.arange(width) < lengths[:, None])
    out.numpy()[mask.numpy()] = values
    return out, mask


def pad_items(seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence of 1-D arrays (numpy object column, DataLoader items) -> padded + mask."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    return pad_ragged(np.concatenate(seqs), lengths)


def pad_arrow_column(column: pa.ChunkedArray) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``list<int>`` Arrow column -> padded + mask, straight from the offsets (no per-row
    Python): the fastest way a Ray ``ArrowBatchCollateFn`` user would write it."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_numpy()
    return pad_ragged(values, np.diff(offsets))


def numpy_pad_collate(batch: dict[str, np.ndarray], column: str = "tokens") -> dict:
    """For ``iter_batches(batch_format="numpy")``: Ray hands a ragged column as an object
    array of 1-D arrays."""
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items() if k != column}
    out[column], out[f"{column}_mask"] = pad_items(batch[column])
    return out


def arrow_columns_to_torch(table: pa.Table, skip: Sequence[str] = ()) -> dict:
    """Fixed-width scalar columns -> owned tensors (one copy each)."""
    return {
        name: torch.from_numpy(table.column(name).to_numpy().copy())
        for name in table.column_names
        if name not in skip
    }


def arrow_pad_collate(table: pa.Table, column: str = "tokens") -> dict:
    out = arrow_columns_to_torch(table, skip=[column])
    out[column], out[f"{column}_mask"] = pad_arrow_column(table.column(column))
    return out


# -- binary image decode (parquet workload) --------------------------------------------------
def decode_image_column(
    column: pa.ChunkedArray, shape: tuple[int, ...] = IMAGE_SHAPE
) -> torch.Tensor:
    """``binary`` / ``large_binary`` / ``fixed_size_binary`` rows of raw uint8 pixels ->
    one (B, *shape) tensor, copied once straight from the Arrow data buffer."""
    row_bytes = int(np.prod(shape))
    out = torch.empty((len(column), *shape), dtype=torch.uint8)
    flat = out.numpy().reshape(len(column), row_bytes)
    start = 0
    for chunk in column.chunks:
        n = len(chunk)
        if not n:
            continue
        if chunk.null_count:
            raise ValueError(f"image column has {chunk.null_count} null rows")
        buffers = chunk.buffers()
        if pa.types.is_fixed_size_binary(chunk.type):
            if chunk.type.byte_width != row_bytes:
                raise ValueError(
                    f"image rows are {chunk.type.byte_width} bytes, expected {row_bytes}"
                )
            first = chunk.offset * row_bytes
        else:
            off_dtype = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
            offsets = np.frombuffer(
                buffers[1],
                off_dtype,
                count=n + 1,
                offset=chunk.offset * np.dtype(off_dtype).itemsize,
            )
            if offsets[-1] - offsets[0] != n * row_bytes:
                raise ValueError(f"image rows are not all {row_bytes} bytes")
            first = int(offsets[0])
        src = np.frombuffer(buffers[-1], np.uint8, count=n * row_bytes, offset=first)
        flat[start : start + n] = src.reshape(n, row_bytes)
        start += n
    return out


def arrow_image_collate(table: pa.Table, column: str = "image") -> dict:
    """pyarrow.Table -> {image: (B,3,64,64) uint8, other columns}: used as torch_raydata's
    ``collate_fn`` and inside Ray's ``ArrowBatchCollateFn`` alike (the same code)."""
    out = arrow_columns_to_torch(table, skip=[column])
    out[column] = decode_image_column(table.column(column))
    return out


def numpy_image_collate(batch: dict[str, np.ndarray], column: str = "image") -> dict:
    """For ``iter_batches(batch_format="numpy")``: Ray hands binary rows as an object array
    of ``bytes``; one join copies them into one (mutable, owned) buffer."""
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items() if k != column}
    pixels = np.frombuffer(bytearray().join(batch[column]), dtype=np.uint8)
    out[column] = torch.from_numpy(pixels.reshape(len(batch[column]), *IMAGE_SHAPE))
    return out
