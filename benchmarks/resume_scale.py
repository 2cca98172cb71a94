"""Exact resume at scale (issue 17): the consumed-ID set at 10M and 100M IDs, before
(the set as of commit e059a5e, ``benchmarks/_resume_before.py``) and after.

Cases: IDs "random" (N of a 2N range: an affine permutation, so every 2^16-key container
is half full, as after a global shuffle) or "contiguous" (blocks of 8,192 consecutive IDs
dealt round-robin to the ranks, as a split without shuffle); 1 or 8 ranks. Each rank
receives its share in 1,000 batches; "after" sleeps after each batch for the time a
trainer consuming ``--rows-per-s`` rows per second (default 2M: faster than any trainer
here) would take for it (a training step that releases the GIL, as one waiting on a GPU
does) while the set folds the keys on its thread; "before" needs no step (its add is an
append) and builds everything at ``state_dict``. Each case runs in a fresh subprocess (honest peak RSS); the 8 ranks of a
case run one after the other in it (one rank's set alive at a time; the states of all).

Measured per case: ``state_dict()`` on the step's thread (max over ranks); the step's
stall by the set's thread (sleep overshoot, p99, next to the same steps without a set);
the batches still queued at ``state_dict`` (folded there); the fold's CPU (the thread's own
clock); state bytes per rank and merged; checkpoint time = max over ranks of (state +
this rank's write) + the merge (before: every rank's encode, then the gathered sets
decoded and united, which rank 0 does; the all-gather transfer is not included); the
union a resume builds from parts; peak RSS over the process baseline. Then, per set, the
cluster-side filter in a Ray worker: ns per row for blocks of consecutive IDs and for
shuffled blocks, the worker's private memory growth, object-store bytes per node.

    python -m benchmarks.resume_scale [--quick] [--write-results] [--rows-per-s 2e6]
    python -m benchmarks.resume_scale --representations 10000000   # roaring vs numpy runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BATCHES = 1000
BLOCK = 8192
_A = 2_654_435_761  # prime, so i -> A*i mod 2N permutes [0, 2N) for N = 2^a 5^b


def rank_batches(n: int, pattern: str, rank: int, world: int):  # noqa: ANN201
    """The ``rank``'s keys, in BATCHES batches (uint64)."""
    per_rank = n // world
    size = -(-per_rank // BATCHES)
    for k in range(BATCHES):
        j = np.arange(k * size, min((k + 1) * size, per_rank), dtype=np.uint64)
        if len(j) == 0:
            return
        if pattern == "random":
            yield (np.uint64(_A) * (np.uint64(rank) + np.uint64(world) * j)) % np.uint64(2 * n)
        else:
            b = np.uint64(BLOCK)
            yield (j // b) * np.uint64(world) * b + np.uint64(rank) * b + j % b


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _private_bytes() -> int:
    total = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def _enc_bytes(enc: dict) -> int:
    """Bytes of an inline encoding: one blob, or the blobs of a union plus its minus."""
    blobs = enc["bytes"]
    n = sum(map(len, blobs)) if isinstance(blobs, list) else len(blobs)
    return n + len(enc.get("minus") or b"")


def _thread_cpu_s(native_id: int) -> float:
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9


# -- one case, in its own process ---------------------------------------------------------------
def run_case(n: int, pattern: str, world: int, impl: str, rows_per_s: float, spill: str) -> dict:
    from benchmarks._resume_before import BeforeSet, before_merge
    from torch_raydata.pipeline.consumer import EpochProgress
    from torch_raydata.resume import ConsumedSet, ResumeState, merge_states, part_state
    from torch_raydata.resume.merge import GATHER_MAX_BYTES

    fp = {"batch_size": 1, "shuffle_seed": None, "id_column": "id", "columns": None,
          "num_rows": None}
    base_rss = _status("VmRSS")
    out: dict = {"n": n, "pattern": pattern, "ranks": world, "impl": impl}
    states, state_ms, write_ms, stalls, fold_cpu, queued = [], [], [], [], 0.0, 0
    if impl == "after":  # the same steps without the set: the machine's own overshoot
        base = []
        step = -(-n // world // BATCHES) / rows_per_s
        for _ in range(min(300, int(3 / step) + 1)):
            t = time.perf_counter()
            time.sleep(step)
            base.append(time.perf_counter() - t - step)
        out.update(stall_base_p99_ms=float(np.percentile(base, 99)) * 1e3,
                   stall_base_max_ms=max(base) * 1e3)
    for rank in range(world):
        if impl == "before":
            s = BeforeSet()
            for keys in rank_batches(n, pattern, rank, world):
                s.add(keys)
            t = time.perf_counter()
            states.append({"consumed": s.encode()})
            state_ms.append((time.perf_counter() - t) * 1e3)
            del s
            continue
        p = EpochProgress(0, record_ids=True)
        for keys in rank_batches(n, pattern, rank, world):
            p.consumed.add(keys)
            p.batches_yielded += 1
            p.rows_yielded += len(keys)
            p.recent_rows.append(len(keys))
            step = len(keys) / rows_per_s  # the training step, at rows_per_s
            t = time.perf_counter()
            time.sleep(step)
            stalls.append(time.perf_counter() - t - step)
            queued = max(queued, len(p.consumed._queue))
        t = time.perf_counter()
        st = ResumeState().state_dict(
            p, next_epoch=1, consumer_lag=0, id_column="id", batch_size=1, fingerprint=fp,
            world_size=world, spill_dir=None, rank=rank,
        )
        state_ms.append((time.perf_counter() - t) * 1e3)
        if p.consumed._thread is not None:
            fold_cpu += _thread_cpu_s(p.consumed._thread.native_id)
        p.close()
        del p
        states.append(st)
    sizes = [_enc_bytes(s["consumed"]) for s in states]
    out.update(state_ms=max(state_ms), state_ms_ranks=state_ms, state_bytes_rank=max(sizes),
               count_check=None)
    if stalls:
        out.update(stall_max_ms=max(stalls) * 1e3, stall_p99_ms=float(np.percentile(stalls, 99)) * 1e3,
                   fold_ns_per_id=fold_cpu / n * 1e9, max_queued_batches=queued)
    merge_ms, union_ms, form = 0.0, None, "single"
    if world > 1:
        if impl == "before":
            t = time.perf_counter()
            merged = before_merge([s["consumed"] for s in states])
            merge_ms = (time.perf_counter() - t) * 1e3
            out["merged_bytes"] = _enc_bytes(merged)
        else:
            if sum(sizes) > GATHER_MAX_BYTES:
                form = "parts"
                parts = []
                for rank, st in enumerate(states):
                    t = time.perf_counter()
                    parts.append(part_state(st, spill, rank, world))
                    write_ms.append((time.perf_counter() - t) * 1e3)
                states = parts
            t = time.perf_counter()
            merged = merge_states(states)
            merge_ms = (time.perf_counter() - t) * 1e3
            enc = merged["consumed"]
            out["merged_bytes"] = sum(sizes) if form == "parts" else _enc_bytes(enc)
            t = time.perf_counter()
            done = ConsumedSet.decode(enc)
            union_ms = (time.perf_counter() - t) * 1e3
            out["count_check"] = len(done) == n
            del done
    else:
        out["merged_bytes"] = sizes[0]
    per_rank = [a + (write_ms[i] if write_ms else 0.0) for i, a in enumerate(state_ms)]
    out.update(form=form, merge_ms=merge_ms, union_at_resume_ms=union_ms,
               checkpoint_ms=max(per_rank) + merge_ms,
               peak_rss_mb=_status("VmHWM") / 2**20, rss_growth_mb=(_status("VmHWM") - base_rss) / 2**20)
    return out


# -- the filter, in a Ray worker ----------------------------------------------------------------
def run_filter(n: int, pattern: str, impl: str, blocks: int, cache_mb: int = 0) -> dict:
    import ray

    from benchmarks._resume_before import before_mask
    from torch_raydata.resume import ConsumedSet, SharedConsumedSet
    from torch_raydata.resume import filter as rf

    s = ConsumedSet()
    for keys in rank_batches(n, pattern, 0, 1):
        s.add(keys)
    s.bitmap()
    env = {"TORCH_RAYDATA_RESUME_CACHE_BYTES": str(cache_mb << 20)} if cache_mb else {}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    if impl == "after":
        shared = SharedConsumedSet.put(s)
        nbytes, chunks = shared.nbytes, shared.num_chunks
    else:
        blob = s.snapshot()[0]
        shared = ray.put(np.frombuffer(blob, dtype=np.uint8))
        nbytes, chunks = len(blob), 1
    del s

    @ray.remote(num_cpus=1)
    def work(shared, n: int, blocks: int) -> dict:  # noqa: ANN001
        from pyroaring import BitMap64

        rng = np.random.default_rng(0)
        starts = rng.integers(0, 2 * n - BLOCK, blocks)
        kinds = {  # the blocks' IDs, made before the memory baseline
            "consecutive": [np.arange(a, a + BLOCK, dtype=np.uint64) for a in starts],
            "shuffled": [rng.integers(0, 2 * n, BLOCK).astype(np.uint64) for _ in range(blocks)],
        }
        before = _private_bytes()
        res: dict = {}
        bm = None
        for kind, ids in kinds.items():
            t = time.perf_counter()
            hits = 0
            for k in ids:
                if impl == "after":
                    hits += int(shared.mask(k).sum())
                else:
                    if bm is None:  # once per worker process, as the filter did
                        # (a top-level ref argument arrives as its value, zero-copy)
                        bm = BitMap64.deserialize(shared.tobytes())
                    hits += int(before_mask(bm, k).sum())
            res[f"{kind}_ns_per_row"] = (time.perf_counter() - t) / (blocks * BLOCK) * 1e9
            res[f"{kind}_hit_fraction"] = hits / (blocks * BLOCK)
        res["worker_private_growth_mb"] = (_private_bytes() - before) / 2**20
        if impl == "after":
            res["cache"] = rf.cache_stats()
        return res

    out = ray.get(work.remote(shared, n, blocks))
    ray.shutdown()
    out.update(n=n, pattern=pattern, impl=impl, object_store_bytes=nbytes, chunks=chunks,
               worker_cache_budget_mb=cache_mb or rf.WORKER_CACHE_BYTES / 2**20)
    if cache_mb:
        out["impl"] = f"after, cache {cache_mb} MiB"
    return out


# -- the representation chosen ---------------------------------------------------------------------
def compare_representations(n: int) -> str:
    """The roaring bitmap against numpy sorted disjoint runs (start, stop uint64 pairs) for
    the benchmark's IDs: bytes and the time to build each from the keys (one process)."""
    from torch_raydata.resume import ConsumedSet

    rows = ["| IDs | pattern | numpy runs: runs | numpy runs MiB | build ms | roaring MiB | "
            "fold + serialize ms |", "|---:|---|---:|---:|---:|---:|---:|"]
    for pattern in ("random", "contiguous"):
        keys = np.concatenate(list(rank_batches(n, pattern, 0, 1)))
        t = time.perf_counter()
        k = np.sort(keys)
        cut = np.flatnonzero(np.diff(k) != 1) + 1
        starts = k[np.concatenate([[0], cut])]
        stops = k[np.concatenate([cut - 1, [len(k) - 1]])] + np.uint64(1)
        numpy_ms = (time.perf_counter() - t) * 1e3
        s = ConsumedSet()
        t = time.perf_counter()
        s.add(keys)
        blob, _ = s.snapshot()
        roaring_ms = (time.perf_counter() - t) * 1e3
        nbytes = starts.nbytes + stops.nbytes
        rows.append(f"| {n / 1e6:g}M | {pattern} | {len(starts):,} | {nbytes / 2**20:.2f} | "
                    f"{numpy_ms:.0f} | {len(blob) / 2**20:.2f} | {roaring_ms:.0f} |")
    return "\n".join(rows)


# -- driver ----------------------------------------------------------------------------------------
def _sub(args: list[str]) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.resume_scale", *args],
                          cwd=HERE.parent, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f}" if b < 10 * 2**20 else f"{b / 2**20:.0f}"


def table(cases: list[dict], filters: list[dict]) -> str:
    rows = ["| IDs | pattern | ranks | impl | state_dict ms (step thread) | step overshoot p99 ms (set / none) | "
            "fold ns/ID (bg) | backlog batches | state MiB/rank | merged MiB | form | merge ms | "
            "checkpoint ms | union at resume ms | peak RSS growth MiB | load |",
            "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for c in cases:
        def f(key: str, fmt: str = "{:.1f}", c: dict = c) -> str:
            v = c.get(key)
            return "—" if v is None else fmt.format(v)
        rows.append(
            f"| {c['n'] / 1e6:g}M | {c['pattern']} | {c['ranks']} | {c['impl']} | {f('state_ms')} | "
            f"{f('stall_p99_ms')} / {f('stall_base_p99_ms')} | {f('fold_ns_per_id', '{:.0f}')} | {f('max_queued_batches', '{:.0f}')} | {_mb(c['state_bytes_rank'])} | "
            f"{_mb(c['merged_bytes'])} | {c['form'] if c['impl'] == 'after' else 'single'} | "
            f"{f('merge_ms')} | {f('checkpoint_ms')} | {f('union_at_resume_ms')} | "
            f"{c['rss_growth_mb']:.0f} | {c.get('loadavg', float('nan')):.1f} |")
    rows += ["", "Cluster-side filter (one Ray worker; blocks of 8,192 rows):", "",
             "| IDs | pattern | impl | object store MiB/node | chunks | consecutive ns/row | "
             "shuffled ns/row | worker private growth MiB | cache peak MiB (budget) | load |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in filters:
        cache = r.get("cache")
        peak = f"{cache['peak_bytes'] / 2**20:.1f} ({r['worker_cache_budget_mb']:.0f})" if cache else "—"
        rows.append(
            f"| {r['n'] / 1e6:g}M | {r['pattern']} | {r['impl']} | {_mb(r['object_store_bytes'])} | "
            f"{r['chunks']} | {r['consecutive_ns_per_row']:.0f} | {r['shuffled_ns_per_row']:.0f} | "
            f"{r['worker_private_growth_mb']:.1f} | {peak} | {r.get('loadavg', float('nan')):.1f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="1M IDs, short steps (smoke test)")
    p.add_argument("--rows-per-s", type=float, default=2e6,
                   help="the emulated training step's pace, rows per second per rank")
    p.add_argument("--reuse-filters", default=None,
                   help="an earlier results_resume.json: keep its filter rows, run none")
    p.add_argument("--sizes", default=None, help="e.g. 10000000,100000000")
    p.add_argument("--impls", default="before,after")
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--reuse-cases", default=None,
                   help="an earlier results_resume.json: keep its cases of the impls not run now")
    p.add_argument("--representations", type=int, default=0,
                   help="N: compare roaring with numpy runs at N IDs, print, exit")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--filter", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.case:  # child: n,pattern,ranks,impl
        n, pattern, world, impl = a.case.split(",")
        print(json.dumps(run_case(int(n), pattern, int(world), impl, a.rows_per_s, str(out / "parts"))))
        return
    if a.representations:
        print(compare_representations(a.representations))
        return
    if a.filter:  # child: n,pattern,impl,blocks[,cache MiB]
        n, pattern, impl, blocks, *cache = a.filter.split(",")
        print(json.dumps(run_filter(int(n), pattern, impl, int(blocks), int(cache[0]) if cache else 0)))
        return
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else (
        [1_000_000] if a.quick else [10_000_000, 100_000_000])
    pace = 2e7 if a.quick else a.rows_per_s
    impls = a.impls.split(",")
    load0 = os.getloadavg()
    cases, filters = [], []
    if a.reuse_cases:  # an earlier run's cases of the other impls (e.g. "before")
        cases = [c for c in json.loads(Path(a.reuse_cases).read_text())["cases"]
                 if c["impl"] not in impls or c["n"] not in sizes]
        impls_filter = ["before", "after"]
    else:
        impls_filter = impls
    for n in sizes:
        for pattern in ("random", "contiguous"):
            for world in (1, 8):
                for impl in impls:
                    c = _sub(["--case", f"{n},{pattern},{world},{impl}", "--rows-per-s", str(pace),
                              "--out", str(out)])
                    c["loadavg"] = os.getloadavg()[0]
                    print(json.dumps(c), flush=True)
                    cases.append(c)
            variants = [(impl, 0) for impl in impls_filter]
            if pattern == "random" and "after" in impls_filter:  # a cache smaller than the set
                variants.append(("after", 1 if a.quick else 8))
            if a.reuse_filters:
                variants = []
            for impl, cache_mb in variants:
                r = _sub(["--filter", f"{n},{pattern},{impl},{20 if a.quick else 200},{cache_mb}"])
                r["loadavg"] = os.getloadavg()[0]
                print(json.dumps(r), flush=True)
                filters.append(r)
    if a.reuse_filters:
        filters = json.loads(Path(a.reuse_filters).read_text())["filters"]
    load1 = os.getloadavg()
    order = {"before": 0, "after": 1}
    cases.sort(key=lambda c: (c["n"], c["pattern"] != "random", c["ranks"], order[c["impl"]]))
    md = table(cases, filters)
    machine = (f"{os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}; "
               f"load average (1 min) {load0[0]:.2f} at start, {load1[0]:.2f} at end, per case in "
               "results_resume.json (the machine is shared with other sessions)")
    if a.reuse_cases:
        machine += (f"; the {', '.join(sorted({c['impl'] for c in cases} - set(impls)))} cases "
                    "come from an earlier run of this harness (same code for them)")
    if a.reuse_filters:
        machine += "; the filter rows come from an earlier run of this harness"
    payload = {"cases": cases, "filters": filters, "machine": machine, "rows_per_s": pace}
    (out / "results_resume.json").write_text(json.dumps(payload, indent=1))
    (out / "table_resume.md").write_text(md + "\n")
    print("\n" + md + "\n\n" + machine)
    if a.write_results:
        _write_results(payload, md)


def rewrite_results(path: str) -> None:
    """RESULTS_resume.md again from a run's results_resume.json (e.g. after a change to
    the table's layout), without measuring anything."""
    payload = json.loads(Path(path).read_text())
    _write_results(payload, table(payload["cases"], payload["filters"]))


def _write_results(payload: dict, md: str) -> None:
    text = f"""# Resume at scale: results (generated by `python -m benchmarks.resume_scale --write-results`)

Generated whole from one run; nothing here is written by hand. What is measured and how:
the docstring of `benchmarks/resume_scale.py`. "before" is the consumed set as of commit
e059a5e (`benchmarks/_resume_before.py`), "after" this code; same harness, same IDs. The
plan for 1B IDs and 1,000 ranks built on these numbers: `docs/scale.md`.

- {payload['machine']}
- training step emulated per batch ("after"): a sleep of batch rows / {payload['rows_per_s']:,.0f}
  rows/s (faster than any trainer here consumes); 1,000 batches per rank
- "load": the 1-minute load average right after the case (2 cores; other sessions share them)

{md}
"""
    (HERE / "RESULTS_resume.md").write_text(text)


if __name__ == "__main__":
    main()
