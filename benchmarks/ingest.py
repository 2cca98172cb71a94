"""Workload W7: image training ingest over several epochs, each competitor in its own process.

Shaped like Ray's training-ingest benchmark (ray-project/ray
``release/train_tests/benchmark/simple_ingest_benchmark.py``, its "data_bound" variant),
scaled to a 2-core machine:

    data       ~1,200 photographic-looking 256x256 RGB JPEGs (quality 90), generated
               here (seeded), stored as bytes in 6 parquet files (``image`` binary,
               ``label`` int64), cached under the temp dir keyed by the parameters
    pipeline   ray.data.read_parquet(dir).map(transform_row): JPEG decode (Pillow),
               random resized crop to 224, random horizontal flip, ImageNet
               normalisation, float32 CHW
    consumer   batch 64, a tiny CNN (two convs, one linear) and an SGD step per batch,
               torch.set_num_threads(1); 3 epochs

Competitors (each over the same rows and the same per-row ``transform_row``):

    trd         trd.RayIterableDataset(ds, batch_size=64), library defaults; the SAME
                object is iterated once per epoch (what users do; the library may start
                the next epoch early)
    ray_itb     ds.iter_torch_batches(batch_size=64), once per epoch
    dataloader  torch DataLoader(num_workers=2, persistent_workers=True, shuffle=True) over
                a map-style dataset holding the JPEG bytes, read from the parquet files into
                memory BEFORE the clock starts; transform_row runs in its worker processes

Each competitor runs in a fresh Python process, one after the other (no Ray workers and
DataLoader workers alive at the same time; each Ray competitor starts its own local Ray).

Owns: the data generation and cache, the per-row transform, the model step, the per-epoch
measurement loop, the object-store sampler, the subprocess schedule and the W7 table. Uses
torch_raydata through its public API only (constructor defaults, ``stats()``).

Per competitor and epoch: ``first_batch_s`` (from right before ``iter()`` to the first
batch in hand: executor / worker start included), ``wall_s`` (``iter()`` to the end of the
epoch, training steps included), ``steady_rows_per_s`` (rows after the first batch / time
after the first batch). Per competitor: the wall of all epochs (first ``iter()`` to the end
of the last epoch; building the Dataset and loader objects is not in it, see
``setup_s``) and the peak object-store bytes in use, sampled every 0.2 s (see
``ObjectStoreSampler``).

    python -m benchmarks.ingest                 # W7 alone, full size, table on stdout
    python -m benchmarks.ingest --smoke         # 96 images, 2 epochs, every competitor
    python -m benchmarks.bench --workloads w7   # the same through the main harness
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

__all__ = [
    "COMPETITORS",
    "goals",
    "LABELS",
    "W7Config",
    "prepare_data",
    "transform_row",
    "run_w7",
    "markdown_w7",
]

COMPETITORS = ("trd", "ray_itb", "dataloader")
LABELS = {
    "trd": "torch_raydata RayIterableDataset (defaults)",
    "ray_itb": "Ray iter_torch_batches",
    "dataloader": "torch DataLoader(num_workers=2, persistent_workers=True)",
}
BATCH_SIZE = 64
CROP = 224
SIDE = 256
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
NUM_CLASSES = 10
SAMPLE_EVERY_S = 0.2
DATA_VERSION = 1  # bump when the generator changes: the cache key includes it


@dataclasses.dataclass(frozen=True)
class W7Config:
    images: int = 1200
    files: int = 6
    epochs: int = 3
    seed: int = 7
    quality: int = 90

    @classmethod
    def smoke(cls) -> W7Config:
        return cls(images=96, files=2, epochs=2)


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


# -- the consumer -----------------------------------------------------------------------------
def make_step() -> Any:
    """A tiny CNN and one SGD step per batch (one torch thread: the loaders get the rest)."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, NUM_CLASSES),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def step(batch: dict[str, Any]) -> int:
        x = torch.as_tensor(batch["image"])
        y = torch.as_tensor(batch["label"]).long()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return len(y)

    return step


# -- object-store bytes -----------------------------------------------------------------------
class ObjectStoreSampler:
    """Peak object-store (plasma) bytes in use on this (single-node) cluster, sampled on a
    thread every 0.2 s.

    Reads public Ray API: ``ray.cluster_resources()["object_store_memory"]`` minus
    ``ray.available_resources()["object_store_memory"]``. The raylet sets its available
    ``object_store_memory`` to the store's capacity minus the bytes plasma holds (every
    object in the store: primary copies, pinned and cached ones) and reports it to the GCS
    with its resource updates, so the figure lags by up to one update (~0.1 s here; a
    100 MiB ``ray.put`` showed up within 0.3 s and went back to 0 within 0.3 s of its
    release). ``ray memory --stats-only`` asks the raylet directly but needs grpcio, which
    this venv's Ray does not ship. One sample costs ~1 ms.
    """

    def __init__(self, every_s: float = SAMPLE_EVERY_S) -> None:
        self.every_s = every_s
        self.peak: int | None = None
        self.samples = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="w7-object-store-sampler", daemon=True
        )

    @staticmethod
    def used_bytes() -> int:
        import ray

        key = "object_store_memory"
        return int(ray.cluster_resources().get(key, 0) - ray.available_resources().get(key, 0))

    def _run(self) -> None:
        try:
            while True:
                used = self.used_bytes()
                self.samples += 1
                self.peak = used if self.peak is None else max(self.peak, used)
                if self._stop.wait(self.every_s):
                    return
        except Exception as e:  # noqa: BLE001 - a measurement aid, never fail the run
            self.error = f"{type(e).__name__}: {e}"

    def start(self) -> ObjectStoreSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# -- one competitor, in this process ----------------------------------------------------------
def _init_ray() -> None:
    import ray

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH", "")
    if root not in path.split(os.pathsep):  # Ray workers unpickle transform_row from here
        os.environ["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled"
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)


def _stats_dict(ds: Any) -> dict[str, Any]:
    s = ds.stats()
    if dataclasses.is_dataclass(s):
        return json.loads(json.dumps(dataclasses.asdict(s), default=str))
    return {"repr": repr(s)}


def run_one(key: str, path: str, epochs: int) -> dict[str, Any]:
    """Run competitor ``key`` for ``epochs`` epochs over the files in ``path``."""
    import warnings

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    step = make_step()
    t_setup = time.perf_counter()
    sampler: ObjectStoreSampler | None = None
    trd_ds: Any = None
    if key == "dataloader":
        from torch.utils.data import DataLoader

        blobs, labels = read_in_memory(path)  # before the clock (README: W7)
        loader = DataLoader(
            JpegDataset(blobs, labels),
            batch_size=BATCH_SIZE,
            num_workers=2,
            persistent_workers=True,
            shuffle=True,
        )

        def epoch_iterable() -> Any:
            return loader
    else:
        import ray

        _init_ray()
        ds = ray.data.read_parquet(path).map(transform_row)
        if key == "trd":
            import torch_raydata as trd

            trd_ds = trd.RayIterableDataset(ds, batch_size=BATCH_SIZE)

            def epoch_iterable() -> Any:
                return trd_ds
        elif key == "ray_itb":

            def epoch_iterable() -> Any:
                return ds.iter_torch_batches(batch_size=BATCH_SIZE)
        else:
            raise ValueError(f"competitor {key!r} is not one of {COMPETITORS}")
        sampler = ObjectStoreSampler().start()
    setup_s = time.perf_counter() - t_setup

    results: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for epoch in range(epochs):
        rows = batches = 0
        first = float("nan")
        start = time.perf_counter()
        for batch in epoch_iterable():  # the clock includes iter(): executor / workers start
            if batches == 0:
                first = time.perf_counter() - start
            rows += step(batch)
            batches += 1
        wall = time.perf_counter() - start
        after = wall - first
        entry: dict[str, Any] = {
            "epoch": epoch,
            "rows": rows,
            "batches": batches,
            "first_batch_s": first,
            "wall_s": wall,
            "steady_rows_per_s": (rows - min(rows, BATCH_SIZE)) / after
            if after > 0
            else float("nan"),
        }
        if trd_ds is not None:
            entry["trd_stats"] = _stats_dict(trd_ds)
        results.append(entry)
        log(
            f"  w7 {key:10s} epoch {epoch + 1}/{epochs}: first batch {first:6.2f} s, "
            f"wall {wall:6.2f} s, {rows} rows"
        )
    total = time.perf_counter() - t_all
    out: dict[str, Any] = {
        "key": key,
        "setup_s": setup_s,
        "total_wall_s": total,
        "epochs": results,
        "object_store_peak_bytes": None,
        "object_store_samples": 0,
        "object_store_error": None if sampler else "n/a (no Ray in this process)",
    }
    if sampler is not None:
        sampler.stop()
        out["object_store_peak_bytes"] = sampler.peak
        out["object_store_samples"] = sampler.samples
        out["object_store_error"] = sampler.error
    if trd_ds is not None:
        trd_ds.close()
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the schedule and the table ---------------------------------------------------------------
def run_w7(
    cfg: W7Config, keys: tuple[str, ...] = COMPETITORS, timeout_s: float = 1800
) -> dict[str, Any]:
    """Every competitor in its own fresh process, one after the other; returns the payload."""
    t0 = time.perf_counter()
    path = prepare_data(cfg)
    log(
        f"w7: {cfg.images} JPEGs in {cfg.files} parquet files at {path} "
        f"(ready after {time.perf_counter() - t0:.1f} s), {cfg.epochs} epochs"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="trd_w7_out.") as tmp:
        for key in keys:
            out = os.path.join(tmp, f"{key}.json")
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.ingest",
                "--one",
                key,
                "--data",
                path,
                "--epochs",
                str(cfg.epochs),
                "--json",
                out,
            ]
            proc = subprocess.run(cmd, cwd=root, env=env, timeout=timeout_s)
            if proc.returncode != 0:
                raise RuntimeError(f"w7 competitor {key} exited with {proc.returncode}")
            with open(out) as f:
                results[key] = json.load(f)
            expected = cfg.images
            for e in results[key]["epochs"]:
                if e["rows"] != expected:
                    raise AssertionError(
                        f"w7 {key} epoch {e['epoch']}: {e['rows']} rows, expected {expected}"
                    )
    return {
        "config": dataclasses.asdict(cfg) | {"batch_size": BATCH_SIZE, "data_dir": path},
        "labels": {k: LABELS[k] for k in keys},
        "results": results,
        "ratios": ratios(results),
    }


def _later_first(r: dict[str, Any]) -> float:
    later = [e["first_batch_s"] for e in r["epochs"][1:]]
    return float(np.median(later)) if later else float("nan")


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """trd ÷ each other competitor: wall of all epochs, and first batch of later epochs."""
    out: dict[str, float] = {}
    if "trd" not in results:
        return out
    t = results["trd"]
    for peer in ("ray_itb", "dataloader"):
        if peer in results:
            p = results[peer]
            out[f"total_wall_trd_over_{peer}"] = t["total_wall_s"] / p["total_wall_s"]
            lf_t, lf_p = _later_first(t), _later_first(p)
            out[f"later_first_batch_trd_over_{peer}"] = (
                lf_t / lf_p if lf_p > 0 and not np.isnan(lf_p) else float("nan")
            )
    return out


def goals(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's W7 goals (same-run ratios), in ``report.goals``' format."""
    rat = payload["ratios"]
    n = payload["config"]["epochs"]
    items = (
        (f"W7 {n}-epoch wall ÷ ray_itb", "total_wall_trd_over_ray_itb", 0.8),
        (f"W7 {n}-epoch wall ÷ dataloader", "total_wall_trd_over_dataloader", 1.0),
        (
            "W7 first batch of later epochs ÷ dataloader",
            "later_first_batch_trd_over_dataloader",
            1.0,
        ),
    )
    out = []
    for goal, key, need in items:
        v = rat.get(key)
        known = v is not None and not np.isnan(v)
        out.append(
            {
                "goal": goal,
                "setting": "trd",
                "measured": v if known else None,
                "target": f"<= {need}",
                "met": bool(known and v <= need),
            }
        )
    return out


def _f(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    return f"{v:,.{digits}f}"


def _ratio(v: float | None) -> str:
    return "—" if v is None or np.isnan(v) else f"{v:.2f}x"


def markdown_w7(payload: dict[str, Any]) -> str:
    cfg, results = payload["config"], payload["results"]
    n = cfg["epochs"]
    lines = [
        f"**7. image ingest: {cfg['images']:,} JPEGs 256x256 in {cfg['files']} parquet files, "
        f"read_parquet + map(decode, random resized crop 224, flip, normalize), batch "
        f"{cfg['batch_size']}, tiny CNN step, {n} epochs, each competitor in a fresh process**",
        "",
        f"| competitor | {n}-epoch wall s | first batch s, epoch 1 | first batch s, later epochs "
        "| epoch wall s (each) | steady rows/s (each epoch) | peak object store MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        eps = r["epochs"]
        later = " / ".join(_f(e["first_batch_s"]) for e in eps[1:]) or "—"
        walls = " / ".join(_f(e["wall_s"]) for e in eps)
        rates = " / ".join(_f(e["steady_rows_per_s"], 0) for e in eps)
        peak = r["object_store_peak_bytes"]
        store = _f(peak / 2**20, 1) if peak is not None else "n/a"
        lines.append(
            f"| {payload['labels'][key]} | {_f(r['total_wall_s'])} | {_f(eps[0]['first_batch_s'])} "
            f"| {later} | {walls} | {rates} | {store} |"
        )
    rat = payload["ratios"]
    if rat:
        lines += ["", "| ratio (same run) | trd ÷ ray_itb | trd ÷ dataloader |", "|---|---|---|"]
        for name, label in (
            ("total_wall", f"{n}-epoch wall"),
            ("later_first_batch", "first batch, later epochs (median)"),
        ):
            cells = [_ratio(rat.get(f"{name}_trd_over_{p}")) for p in ("ray_itb", "dataloader")]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="96 images, 2 files, 2 epochs")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--competitors", default=",".join(COMPETITORS))
    ap.add_argument("--out", default=None, help="write the payload as JSON here")
    # internal: one competitor in this process (run_w7 starts these)
    ap.add_argument("--one", choices=COMPETITORS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        result = run_one(args.one, args.data, args.epochs or W7Config.epochs)
        with open(args.json, "w") as f:
            json.dump(result, f)
        return 0
    base = W7Config.smoke() if args.smoke else W7Config()
    cfg = dataclasses.replace(
        base,
        images=args.images or base.images,
        files=args.files or base.files,
        epochs=args.epochs or base.epochs,
    )
    keys = tuple(k for k in args.competitors.split(",") if k)
    for k in keys:
        if k not in COMPETITORS:
            ap.error(f"competitor {k!r} is not one of {COMPETITORS}")
    payload = run_w7(cfg, keys)
    print(markdown_w7(payload), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
