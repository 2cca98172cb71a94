"""Workload 7's data and per-row transform (see ``ingest.py`` for the workload).

Owns: the synthetic photographic JPEGs and their parquet files (generated once per
parameters into the temp dir), the in-memory copy the DataLoader competitor reads, and
``transform_row``, the one per-row transform every competitor runs (in Ray's map tasks or
in DataLoader worker processes: both import it from here). Does not own how competitors
iterate or what is measured (``ingest.py``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
from typing import Any

import numpy as np

__all__ = [
    "W7Config",
    "prepare_data",
    "read_in_memory",
    "random_resized_crop_box",
    "transform_row",
    "JpegDataset",
    "NUM_CLASSES",
]

CROP = 224
SIDE = 256
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
NUM_CLASSES = 10
DATA_VERSION = 1  # bump when the generator changes: the cache key includes it


@dataclasses.dataclass(frozen=True)
class W7Config:
    images: int = 1200
    files: int = 6
    epochs: int = 3
    seed: int = 7
    quality: int = 90
    rounds: int = 2  # A B C A B C: ratios are taken within a round, then their median

    @classmethod
    def smoke(cls) -> W7Config:
        return cls(images=96, files=2, epochs=2, rounds=1)


# -- data -------------------------------------------------------------------------------------
def _photo(rng: np.random.Generator) -> Any:
    """A 256x256 RGB image that JPEG-compresses like a photo: smooth colour gradients,
    a few soft-edged shapes, fine noise (a flat synthetic image would decode too fast)."""
    from PIL import Image, ImageDraw, ImageFilter

    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    base = np.empty((SIDE, SIDE, 3), np.float32)
    for c in range(3):
        a, b, f, p = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(1, 6), rng.uniform(0, 6)
        base[..., c] = 128 + 60 * (a * x + b * y) + 40 * np.sin(f * (x + y) + p)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.integers(0, SIDE - 32, 2)
        w, h = rng.integers(24, 140, 2)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (SIDE, SIDE, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def data_dir(cfg: W7Config) -> str:
    key = f"trd_w7_v{DATA_VERSION}_n{cfg.images}_f{cfg.files}_s{cfg.seed}_q{cfg.quality}"
    return os.path.join(tempfile.gettempdir(), key)


def prepare_data(cfg: W7Config) -> str:
    """The parquet files of ``cfg`` (generated once, then reused from the temp dir)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = data_dir(cfg)
    if os.path.exists(os.path.join(path, "_DONE")):
        return path
    rng = np.random.default_rng(cfg.seed)
    work = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp.")
    try:
        edges = np.linspace(0, cfg.images, cfg.files + 1).astype(int)
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            blobs, labels = [], []
            for _ in range(a, b):
                buf = io.BytesIO()
                _photo(rng).save(buf, format="JPEG", quality=cfg.quality)
                blobs.append(buf.getvalue())
                labels.append(int(rng.integers(0, NUM_CLASSES)))
            table = pa.table(
                {"image": pa.array(blobs, pa.binary()), "label": pa.array(labels, pa.int64())}
            )
            pq.write_table(table, os.path.join(work, f"part-{i:03d}.parquet"))
        open(os.path.join(work, "_DONE"), "w").close()
        try:
            os.rename(work, path)  # atomic: a concurrent run sees all files or none
        except OSError:  # another run got there first
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return path


def read_in_memory(path: str) -> tuple[list[bytes], np.ndarray]:
    """The JPEG bytes and labels of every file (the DataLoader's map-style dataset)."""
    import pyarrow.parquet as pq

    blobs: list[bytes] = []
    labels: list[np.ndarray] = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".parquet"):
            t = pq.read_table(os.path.join(path, name))
            blobs += t.column("image").to_pylist()
            labels.append(t.column("label").to_numpy())
    return blobs, np.concatenate(labels)


# -- the per-row transform (Ray map tasks and DataLoader workers run this same function) ------
def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: area 8-100%, aspect 3/4-4/3, 10 tries, then
    the centre crop."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def transform_row(row: dict[str, Any]) -> dict[str, Any]:
    """Decode, random resized crop to 224, random flip, normalise; float32 (3, 224, 224).

    Unseeded (a fresh random draw per row and epoch), as in training."""
    from PIL import Image

    rng = np.random.default_rng()
    img = Image.open(io.BytesIO(row["image"])).convert("RGB")
    box = random_resized_crop_box(img.width, img.height, rng)
    img = img.resize((CROP, CROP), Image.BILINEAR, box=box)
    arr = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    chw = arr.transpose(2, 0, 1) * np.float32(1 / 255)
    return {"image": np.ascontiguousarray((chw - MEAN) / STD), "label": row["label"]}


class JpegDataset:
    """Map-style dataset over the JPEG bytes in memory; the same transform per item."""

    def __init__(self, blobs: list[bytes], labels: np.ndarray) -> None:
        self.blobs, self.labels = blobs, labels

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return transform_row({"image": self.blobs[i], "label": int(self.labels[i])})
