"""Workload W7: image training ingest over several epochs, each competitor in its own process.

Shaped like Ray's training-ingest benchmark (ray-project/ray
``release/train_tests/benchmark/simple_ingest_benchmark.py``, its "data_bound" variant),
scaled to a 2-core machine (data and transform: ``ingest_data.py``):

    data       1,200 photographic-looking 256x256 RGB JPEGs (quality 90), seeded, stored
               as bytes in 6 parquet files (``image`` binary, ``label`` int64), cached
               under the temp dir keyed by the parameters
    pipeline   ray.data.read_parquet(dir).map(transform_row): JPEG decode (Pillow),
               random resized crop to 224, random horizontal flip, ImageNet
               normalisation, float32 CHW
    consumer   batch 64, a tiny CNN (two convs, one linear) and an SGD step per batch,
               torch.set_num_threads(1); 3 epochs

Competitors (each over the same rows and the same per-row ``transform_row``):

    trd         trd.RayIterableDataset(ds, batch_size=64), library defaults; the SAME
                object is iterated once per epoch (what users do; the library may start
                the next epoch early)
    trd_noprestart  the same with prestart=False (what epoch pipelining is worth)
    ray_itb     ds.iter_torch_batches(batch_size=64), once per epoch
    dataloader  torch DataLoader(num_workers=2, persistent_workers=True, shuffle=True) over
                a map-style dataset holding the JPEG bytes, read from the parquet files into
                memory BEFORE the clock starts; transform_row runs in its worker processes

Each competitor runs in a fresh Python process, one after the other (no Ray workers and
DataLoader workers alive at the same time; each Ray competitor starts its own local Ray),
in rounds (A B C A B C): ratios are taken within a round, then their median.

Owns: the model step, the per-epoch measurement loop, the object-store sampler, the
subprocess schedule and the W7 table and goals. Uses torch_raydata through its public API
only (constructor defaults, ``stats()``).

Per competitor and epoch: ``first_batch_s`` (from right before ``iter()`` to the first
batch in hand: executor / worker start included), ``wall_s`` (``iter()`` to the end of the
epoch, training steps included), ``steady_rows_per_s`` (rows after the first batch / time
after the first batch). Per competitor: the wall of all epochs (first ``iter()`` to the end
of the last epoch; building the Dataset and loader objects and starting Ray is not in it,
see ``setup_s``) and the peak object-store bytes in use, sampled every 0.2 s (see
``ObjectStoreSampler``).

    python -m benchmarks.ingest                 # W7 alone, full size, table on stdout
    python -m benchmarks.ingest --smoke         # 96 images, 2 epochs, 1 round, every competitor
    python -m benchmarks.bench --workloads w7   # the same through the main harness
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from . import start_local_ray
from .ingest_data import (
    NUM_CLASSES,
    JpegDataset,
    W7Config,
    prepare_data,
    read_in_memory,
    transform_row,
)

__all__ = ["COMPETITORS", "LABELS", "W7Config", "goals", "run_w7", "markdown_w7"]

COMPETITORS = ("trd", "trd_noprestart", "ray_itb", "dataloader")
LABELS = {
    "trd": "torch_raydata RayIterableDataset (defaults)",
    "trd_noprestart": "torch_raydata, prestart=False (every epoch starts at iter())",
    "ray_itb": "Ray iter_torch_batches",
    "dataloader": "torch DataLoader(num_workers=2, persistent_workers=True)",
}
BATCH_SIZE = 64
SAMPLE_EVERY_S = 0.2


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


# -- where the CPU goes --------------------------------------------------------------------------
# Process names (Linux ``comm``, 15 chars) of Ray's own per-node processes and actors: the
# rest of the ``ray::`` processes run the pipeline's tasks (named ``ray::IDLE`` between tasks).
RAY_DAEMONS = (
    "raylet",
    "gcs_server",
    "ray::_StatsActo",
    "ray::_Autoscali",
    "ray::DashboardA",
    "ray::RuntimeEnv",
)
CPU_ROLES = ("trainer", "workers", "ray_daemons")


def process_tree_cpu(root: int | None = None) -> dict[int, tuple[str, float]]:
    """``{pid: (role, CPU seconds so far)}`` for ``root`` (this process) and every process
    below it, from ``/proc`` (Linux only; {} elsewhere). Roles: ``trainer`` (this process),
    ``ray_daemons`` (:data:`RAY_DAEMONS`, and the non-``ray::`` Python helpers Ray starts:
    log monitor, dashboard), ``workers`` (Ray workers running tasks, DataLoader worker
    processes). A process tree, so another session's processes on the machine are not
    counted; ``ray.init(address="local")`` starts the raylet and GCS below the driver."""
    root = os.getpid() if root is None else root
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2 :].split()
        procs[pid] = (int(rest[1]), name, (int(rest[11]) + int(rest[12])) / tick)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    tree: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            tree.append(pid)
            todo.extend(children.get(pid, ()))
    ray_here = any(procs[pid][1] == "raylet" for pid in tree)
    out: dict[int, tuple[str, float]] = {}
    for pid in tree:
        _, name, cpu = procs[pid]
        if pid == root:
            role = "trainer"
        elif name in RAY_DAEMONS or (ray_here and not name.startswith("ray::")):
            # Ray's Python helpers (log monitor, autoscaler monitor, dashboard) run below
            # the driver; without Ray here, a child is a DataLoader worker.
            role = "ray_daemons"
        else:
            role = "workers"
        out[pid] = (role, cpu)
    return out


def cpu_by_role(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two :func:`process_tree_cpu` snapshots, per role (a
    process that started in between counts from 0)."""
    totals = dict.fromkeys(CPU_ROLES, 0.0)
    for pid, (role, cpu) in after.items():
        totals[role] += cpu - before.get(pid, (role, 0.0))[1]
    return totals


# -- one competitor, in this process ----------------------------------------------------------
def _init_ray() -> None:
    import ray

    start_local_ray()  # Ray workers unpickle transform_row from this package
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
        if key in ("trd", "trd_noprestart"):
            import torch_raydata as trd

            trd_ds = trd.RayIterableDataset(ds, batch_size=BATCH_SIZE, prestart=key == "trd")

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
    cpu0 = process_tree_cpu()
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
    cpu = cpu_by_role(cpu0, process_tree_cpu())  # before any teardown: workers still live
    out: dict[str, Any] = {
        "key": key,
        "setup_s": setup_s,
        "total_wall_s": total,
        "cpu_s": cpu,
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
def _run_subprocess(key: str, path: str, epochs: int, tmp: str, timeout_s: float) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    out = os.path.join(tmp, f"{key}.json")
    cmd = [sys.executable, "-m", "benchmarks.ingest", "--one", key, "--data", path]
    cmd += ["--epochs", str(epochs), "--json", out]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=root, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"w7 competitor {key} exited with {proc.returncode}")
    with open(out) as f:
        result = json.load(f)
    result["loadavg"] = (load0, os.getloadavg()[0])
    return result


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.median(values)) if values else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One competitor over its rounds: per epoch and overall, the median of each figure."""
    n_epochs = len(runs[0]["epochs"])
    epochs = []
    for i in range(n_epochs):
        per = [r["epochs"][i] for r in runs]
        epochs.append(
            {
                "epoch": i,
                "rows": per[0]["rows"],
                "batches": per[0]["batches"],
                **{
                    k: _median([e[k] for e in per])
                    for k in ("first_batch_s", "wall_s", "steady_rows_per_s")
                },
            }
        )
    peaks = [r["object_store_peak_bytes"] for r in runs if r["object_store_peak_bytes"] is not None]
    errors = [r["object_store_error"] for r in runs if r["object_store_error"]]
    return {
        "rounds": len(runs),
        "total_wall_s": _median([r["total_wall_s"] for r in runs]),
        "total_wall_s_all": [r["total_wall_s"] for r in runs],
        "epochs": epochs,
        "object_store_peak_bytes": max(peaks) if peaks else None,
        "object_store_samples": sum(r["object_store_samples"] for r in runs),
        "object_store_error": errors[0] if errors else None,
        "loadavg": [r["loadavg"] for r in runs],
        "cpu_s": {
            role: _median([r["cpu_s"][role] for r in runs if "cpu_s" in r]) for role in CPU_ROLES
        },
        "runs": runs,
    }


def run_w7(
    cfg: W7Config, keys: tuple[str, ...] = COMPETITORS, timeout_s: float = 1800
) -> dict[str, Any]:
    """``cfg.rounds`` rounds; in each, every competitor in its own fresh process, one after
    the other (A B C A B C ...). Returns the payload (JSON-able)."""
    t0 = time.perf_counter()
    path = prepare_data(cfg)
    log(
        f"w7: {cfg.images} JPEGs in {cfg.files} parquet files at {path} "
        f"(ready after {time.perf_counter() - t0:.1f} s), {cfg.epochs} epochs, "
        f"{cfg.rounds} round(s)"
    )
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="trd_w7_out.") as tmp:
        for rnd in range(cfg.rounds):
            this: dict[str, Any] = {}
            for key in keys:
                log(f" w7 round {rnd + 1}/{cfg.rounds}: {key}")
                this[key] = _run_subprocess(key, path, cfg.epochs, tmp, timeout_s)
                for e in this[key]["epochs"]:
                    if e["rows"] != cfg.images:
                        raise AssertionError(
                            f"w7 {key} epoch {e['epoch']}: {e['rows']} rows, expected {cfg.images}"
                        )
            rounds.append(this)
    per_round = [ratios(r) for r in rounds]
    return {
        "config": dataclasses.asdict(cfg) | {"batch_size": BATCH_SIZE, "data_dir": path},
        "labels": {k: LABELS[k] for k in keys},
        "results": {k: summarize([r[k] for r in rounds]) for k in keys},
        # ratios within each round (same conditions), then their median
        "ratios_per_round": per_round,
        "ratios": {k: _median([r[k] for r in per_round]) for k in per_round[0]},
    }


def _later_first(r: dict[str, Any]) -> float:
    return _median([e["first_batch_s"] for e in r["epochs"][1:]])


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """trd ÷ each other competitor (one round): wall of all epochs, and the median first
    batch of the later epochs."""
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
    """Issue 12's W7 goals (median of the per-round ratios), in ``report.goals``' format."""
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
    n, rounds = cfg["epochs"], cfg["rounds"]
    of = f"median of {rounds} rounds" if rounds > 1 else "one round"
    lines = [
        f"**7. image ingest: {cfg['images']:,} JPEGs 256x256 in {cfg['files']} parquet files, "
        f"read_parquet + map(decode, random resized crop 224, flip, normalize), batch "
        f"{cfg['batch_size']}, tiny CNN step, {n} epochs; each competitor in a fresh process, "
        f"{of} (A B C A B C ...)**",
        "",
        f"| competitor | {n}-epoch wall s (each round) | first batch s, epoch 1 "
        "| first batch s, later epochs | epoch wall s | steady rows/s | peak object store MiB "
        "| CPU s: trainer / workers / Ray daemons (cores busy) | load avg during |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        eps = r["epochs"]
        later = " / ".join(_f(e["first_batch_s"]) for e in eps[1:]) or "—"
        walls = " / ".join(_f(e["wall_s"]) for e in eps)
        rates = " / ".join(_f(e["steady_rows_per_s"], 0) for e in eps)
        peak = r["object_store_peak_bytes"]
        store = _f(peak / 2**20, 1) if peak is not None else "n/a"
        each = ", ".join(_f(v) for v in r["total_wall_s_all"])
        load = ", ".join(f"{a:.0f}-{b:.0f}" for a, b in r["loadavg"])
        cpu = r.get("cpu_s") or {}
        if cpu and not any(np.isnan(v) for v in cpu.values()):
            busy = sum(cpu.values()) / r["total_wall_s"]
            cpus = " / ".join(_f(cpu[role], 1) for role in CPU_ROLES) + f" ({busy:.2f})"
        else:
            cpus = "n/a"
        lines.append(
            f"| {payload['labels'][key]} | {_f(r['total_wall_s'])} ({each}) "
            f"| {_f(eps[0]['first_batch_s'])} | {later} | {walls} | {rates} | {store} "
            f"| {cpus} | {load} |"
        )
    rat, per_round = payload["ratios"], payload["ratios_per_round"]
    if rat:
        lines += [
            "",
            "| ratio (within each round; median, then each round) | trd ÷ ray_itb "
            "| trd ÷ dataloader |",
            "|---|---|---|",
        ]
        for name, label in (
            ("total_wall", f"{n}-epoch wall"),
            ("later_first_batch", "first batch, later epochs (median over them)"),
        ):
            cells = []
            for peer in ("ray_itb", "dataloader"):
                key = f"{name}_trd_over_{peer}"
                each = ", ".join(_ratio(r.get(key)) for r in per_round)
                cells.append(f"{_ratio(rat.get(key))} ({each})" if key in rat else "—")
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="96 images, 2 files, 2 epochs, 1 round")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="A B C rounds (default 2)")
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
        rounds=args.rounds or base.rounds,
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
