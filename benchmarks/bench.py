"""Benchmark harness: torch_raydata vs Ray's iterators vs torch DataLoader vs memcpy.

    python -m benchmarks.bench              # full run, W1-W7 (~15 min on 2 cores)
    python -m benchmarks.bench --smoke      # every competitor and workload, small sizes
    python -m benchmarks.bench --write-results   # also rewrite benchmarks/RESULTS.md
    python -m benchmarks.bench --workloads w7    # the image-ingest workload alone
    python -m benchmarks.bench --sweep      # tune trd (num_workers x prefetch) and Ray prefetch

Run from the repository root. Workloads 1-6: every competitor of a workload runs in this
process, interleaved (A B C A B C ...), after two untimed epochs each (warm-up and the
batch-ownership check). Workload 7 (``ingest.py``) runs first, each competitor in its own
fresh process, before this process starts Ray. See README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import platform
import sys
import time
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from . import ingest, report, start_local_ray, step_tax
from .competitors import (
    COMPETITORS,
    KNOWN,
    LABELS,
    OPT_IN,
    STEP_TAX_ONLY,
    RayTorch,
    Trd,
    make_competitor,
)
from .measure import owns_memory, run_epoch, time_to_first_batch
from .parquet import probe_parquet_layouts
from .results_md import write_results
from .workloads import WORKLOADS, build_workload

HERE = os.path.dirname(os.path.abspath(__file__))
TTFB_REPS = 3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


ALL_WORKLOADS = (*WORKLOADS, "w7")


def init_ray() -> None:
    # torch.from_numpy on Ray's read-only Arrow views warns once per call site; batch
    # ownership is measured separately (measure.owns_memory), so it is noise here.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if not ray.is_initialized():
        start_local_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)
    # materialize() checks ray.available_resources() right after ray.init, when the CPUs
    # may not be registered yet, and warns that the job "will hang": it does not.
    logging.getLogger("ray.data.dataset").addFilter(
        lambda record: "does not have any available CPUs" not in record.getMessage()
    )


def machine_info() -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cores": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }


def run_workload(wl: Any, keys: list[str], reps: int, expected_rows: int) -> dict[str, dict]:
    comps = {k: make_competitor(k, wl) for k in keys}
    # Long-lived objects (modules, data) leave the collector's view: the gc.collect()
    # before each epoch stays cheap and no full collection lands inside a timed epoch.
    gc.collect()
    gc.freeze()
    try:
        # Untimed: two epochs each (warm-up, then whether an in-place write leaks); one
        # warm-up epoch where Ray re-executes the dataset every epoch (nothing can leak).
        owns: dict[str, float | str] = {}  # fraction of rows delivered as views, or why n/a
        for k, c in comps.items():
            if k == "memcpy":
                owns[k] = "yes (fresh copy)"
                run_epoch(c.epoch, wl.id_column)
            elif wl.recomputed:
                owns[k] = "n/a (re-executed every epoch)"
                run_epoch(c.epoch, wl.id_column)
            else:
                owns[k] = owns_memory(c, wl.id_column, wl.mutate_column)
        epochs: dict[str, list] = {k: [] for k in keys}
        for rep in range(reps):
            for k, c in comps.items():  # interleaved: A B C ... A B C ...
                r = run_epoch(c.epoch, wl.id_column, wl.consumer_ms)
                if r.rows != expected_rows:
                    raise AssertionError(
                        f"{k} on {wl.key}: {r.rows} rows, expected {expected_rows}"
                    )
                r.extra = c.extra()
                epochs[k].append(r)
                log(
                    f"  {wl.key:9s} rep {rep + 1}/{reps} {k:10s} {r.rows_per_s:12,.0f} rows/s  "
                    f"wait p95 {np.percentile(r.waits, 95) * 1e3:8.3f} ms"
                )
        ttfb: dict[str, list[float]] = {k: [] for k in keys}
        for _ in range(min(reps, TTFB_REPS)):  # each cold start also runs a whole epoch
            for k, c in comps.items():
                ttfb[k].append(time_to_first_batch(c, wl.id_column))
    finally:
        for c in comps.values():
            c.close()
        gc.unfreeze()
    return {k: report.summarize(epochs[k], ttfb[k], owns[k]) for k in keys}


STEP_TAX_TITLE = (
    "The training step's own time (W1's data; (a) under W4's 5 ms step, (b) a Python-heavy "
    "step alone vs fed)"
)
#: Competitors of the step-tax measurement: the loaders a user would pick (memcpy and
#: num_workers=0 do no background work: nothing to measure).
STEP_TAX_KEYS = ("floor", "trd", "trd_best", "trd_shm", "ray_torch", "ray_numpy", "dl2")


def run_step_tax(
    cache: dict[str, Any],
    rows: int,
    blocks: int,
    keys: list[str],
    reps: int,
    step_ms: float,
    ops: int = 240,
) -> dict[str, dict[str, float]]:
    """Issue 13's two figures for every competitor of W1 that runs background work."""
    wl = build_workload("fixed", rows, blocks, cache)
    comps = {k: make_competitor(k, wl) for k in keys if k in STEP_TAX_KEYS}
    held = {k: torch.from_numpy(v[:256].copy()) for k, v in wl.columns.items()}
    log("step tax: (a) between-step overhead and (b) step inflation on W1's data")
    gc.collect()
    gc.freeze()
    try:
        return step_tax.inflation(comps, held, reps, step_ms, ops)
    finally:
        for c in comps.values():
            c.close()
        gc.unfreeze()


def sweep(rows: int, blocks: int, reps: int) -> None:
    """Tune trd's (num_workers, prefetch_batches) and Ray's prefetch on workload 1."""
    wl = build_workload("fixed", rows, blocks, {})
    comps: dict[str, Any] = {}
    for w in (1, 2, 4):
        for p in (2, 4, 8, 16):
            comps[f"trd w{w} p{p}"] = Trd(wl, f"w{w}p{p}", num_workers=w, prefetch_batches=p)
    for p in (1, 2, 4, 8):
        comps[f"ray_torch p{p}"] = RayTorch(wl, prefetch_batches=p)
    rates: dict[str, list[float]] = {k: [] for k in comps}
    for c in comps.values():
        run_epoch(c.epoch, wl.id_column)
    for _ in range(reps):
        for k, c in comps.items():
            rates[k].append(run_epoch(c.epoch, wl.id_column).rows_per_s)
    print("| setting | rows/s median | min | max |\n|---|---|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {np.median(v):,.0f} | {min(v):,.0f} | {max(v):,.0f} |")
    for c in comps.values():
        c.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="a few hundred rows, 1 repetition")
    ap.add_argument(
        "--rows", type=int, default=None, help="rows per workload (default 20000; smoke 300)"
    )
    ap.add_argument(
        "--blocks", type=int, default=16, help="Ray blocks / parquet files per workload"
    )
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; smoke 1)")
    ap.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help=f"comma-separated, of {', '.join(ALL_WORKLOADS)}",
    )
    ap.add_argument("--competitors", default=",".join(COMPETITORS))
    ap.add_argument("--step-ms", type=float, default=5.0, help="training step of workload 4")
    ap.add_argument("--parquet-layout", default="fixed_size_binary", help="see the layout probe")
    ap.add_argument(
        "--parquet-reader",
        default="v1",
        choices=("v1", "v2"),
        help="Ray's read_parquet path (v2 lists files with new actors every epoch)",
    )
    ap.add_argument(
        "--w7-epochs", type=int, default=None, help="epochs of workload 7 (default 3; smoke 2)"
    )
    ap.add_argument(
        "--w7-rounds", type=int, default=None, help="rounds of workload 7 (default 2; smoke 1)"
    )
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="JSON / markdown / PNG dir")
    ap.add_argument("--write-results", action="store_true", help="rewrite benchmarks/RESULTS.md")
    ap.add_argument("--sweep", action="store_true", help="tune settings on workload 1 and exit")
    ap.add_argument(
        "--no-step-tax", action="store_true", help="skip the step-tax measurement (W1's data)"
    )
    args = ap.parse_args(argv)
    rows = args.rows or (300 if args.smoke else 20_000)
    reps = args.reps or (1 if args.smoke else 5)
    blocks = min(args.blocks, 3) if args.smoke else args.blocks
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in ALL_WORKLOADS:
            ap.error(f"workload {w!r} is not one of {ALL_WORKLOADS}")
    keys = [k for k in args.competitors.split(",") if k]
    for k in keys:
        if k not in KNOWN:
            ap.error(f"competitor {k!r} is not one of {KNOWN}")
        if k in STEP_TAX_ONLY:
            ap.error(f"competitor {k!r} is measured by the step tax only (always, no need to name it)")

    t_start = time.perf_counter()
    info = machine_info()
    if args.sweep:
        init_ray()
        sweep(rows, blocks, reps)
        return 0
    w7: dict[str, Any] | None = None
    if "w7" in workloads:  # first: its competitors' processes start their own Ray
        workloads.remove("w7")
        cfg = ingest.W7Config.smoke() if args.smoke else ingest.W7Config()
        cfg = dataclasses.replace(
            cfg, epochs=args.w7_epochs or cfg.epochs, rounds=args.w7_rounds or cfg.rounds
        )
        w7 = ingest.run_w7(cfg)
        info["loadavg_after_w7"] = os.getloadavg()
        print(ingest.markdown_w7(w7) + "\n", flush=True)
    probe: list[dict[str, Any]] = []
    if workloads:
        init_ray()
        log(f"torch_raydata benchmark: {rows:,} rows, {reps} reps, workloads {workloads}")
        probe = probe_parquet_layouts(
            rows=200 if args.smoke else 2000, repeats=1 if args.smoke else 3
        )
    cache: dict[str, Any] = {}
    results: dict[str, dict[str, dict]] = {}
    titles: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    load: dict[str, tuple] = {}
    for wk in workloads:
        wl = build_workload(
            wk,
            rows,
            blocks,
            cache,
            step_ms=args.step_ms,
            parquet_layout=args.parquet_layout,
            parquet_reader=args.parquet_reader,
        )
        titles[wk], notes[wk] = wl.title, wl.notes
        log(f"workload {wl.title}")
        results[wk] = run_workload(wl, keys, reps, rows)
        load[wk] = os.getloadavg()
        print(report.markdown_workload(wl.title, results[wk]) + "\n", flush=True)
    tax: dict[str, Any] | None = None
    if "fixed" in workloads and not args.no_step_tax:
        # The opt-in transport='shm' is measured here too (not in --smoke: its actors
        # take seconds to start): issue 13's figures for every way trd can feed a step.
        # And the floor: the same loop fed by no loader (this host's own noise).
        extra = list(STEP_TAX_ONLY) + ([] if args.smoke else [k for k in OPT_IN if k not in keys])
        tax = run_step_tax(
            cache, rows, blocks, keys + extra, 1 if args.smoke else 3, args.step_ms
        )
        load["step_tax"] = os.getloadavg()
        print(step_tax.markdown(STEP_TAX_TITLE, tax, LABELS) + "\n", flush=True)
    for wl in cache.values():
        if wl.cleanup is not None:
            wl.cleanup()
    info["loadavg_end"] = os.getloadavg()
    info["loadavg_after_workload"] = load
    goal_items = (
        report.goals(results)
        + (report.step_tax_goals(tax) if tax else [])
        + (ingest.goals(w7) if w7 else [])
    )
    print(report.markdown_goals(goal_items))
    elapsed = time.perf_counter() - t_start
    payload = {
        "machine": info,
        "config": {
            "rows": rows,
            "reps": reps,
            "blocks": blocks,
            "batch_size": 256,
            "smoke": args.smoke,
            "step_ms": args.step_ms,
            "parquet_layout": args.parquet_layout,
            "parquet_reader": args.parquet_reader,
            "competitors": {k: LABELS[k] for k in keys},
            "elapsed_s": elapsed,
        },
        "titles": titles,
        "notes": notes,
        "parquet_probe": probe,
        "results": results,
        "goals": goal_items,
        "w7": w7,
        "step_tax": tax,
    }
    report.write_json(os.path.join(args.out, "results.json"), payload)
    tables = [report.markdown_workload(titles[w], results[w]) for w in results]
    if tax:
        tables.append(step_tax.markdown(STEP_TAX_TITLE, tax, LABELS))
    if w7:
        tables.append(ingest.markdown_w7(w7))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n\n".join(tables) + "\n\n" + report.markdown_goals(goal_items) + "\n")
    if results:
        report.plot(os.path.join(args.out, "bench.png"), results, titles)
    if args.write_results:
        write_results(os.path.join(HERE, "RESULTS.md"), payload)
    log(f"done in {elapsed:.0f}s; wrote {args.out}/results.json, table.md, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
