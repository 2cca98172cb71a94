"""transport='nixl' (remote collate + NIXL READs) vs transport='local', and raw NIXL READs.

    python -m benchmarks.bench_nixl              # ~5-10 min on 2 busy cores
    python -m benchmarks.bench_nixl --smoke      # every measurement once, small

Measures, per workload and loader (interleaved: local, nixl, nixl-copy, local, ...; one
untimed warm-up epoch each):

    rows/s        rows / wall time of the epoch, from iter() to StopIteration (includes
                  starting the collate actors: a fresh process importing torch, per epoch)
    steady rows/s rows after the first batch / time after the first batch
    first batch   seconds from iter() to the first batch
    CPU/1k rows   getrusage(RUSAGE_SELF) user+sys of THIS (the trainer) process per 1,000
                  rows; the collate actors and Ray's tasks run in other processes. This is
                  the point of remote collate: CPU taken off the trainer.
    READ GB/s     bytes READ by the transport / time stage 6 spent posting and waiting

and the raw NIXL READ rate of the same batch bytes with ``in_flight`` READs posted together
(two agents in one process, and an initiator here reading from a Ray actor's agent, as the
pipeline does), with a memcpy of the same bytes for scale. Results are printed as a table
(and as ratios, since this machine is shared and noisy); findings in docs/performance.md.
Run from the repository root.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import statistics
import sys
import time
import zlib
from typing import Any

import numpy as np
import ray

import torch_raydata as trd
from torch_raydata.transports import NixlTransport


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- workloads ------------------------------------------------------------------------------
def images(rows: int) -> Any:
    """uint8 (3,64,64) images + int64 label, materialized in the object store (12 KiB/row)."""

    def gen(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = b["id"]
        rng = np.random.default_rng(int(ids[0]))
        return {
            "image": rng.integers(0, 255, (len(ids), 3, 64, 64), dtype=np.uint8),
            "label": ids % 1000,
        }

    return (
        ray.data.range(rows, override_num_blocks=max(4, rows // 1000))
        .map_batches(gen)
        .materialize()
    )


_VOCAB = 50_000


def text(rows: int) -> Any:
    """~40-word strings; the collate_fn tokenizes them in Python (per-row CPU work, the case
    Ray #50128 describes) into padded int64 ids and a mask (~1 KiB/row out)."""

    def gen(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = b["id"]
        rng = np.random.default_rng(int(ids[0]))
        words = rng.integers(0, 5000, (len(ids), 56))
        lengths = rng.integers(8, 57, len(ids))
        texts = [" ".join(f"w{w}" for w in ws[:n]) for ws, n in zip(words, lengths, strict=True)]
        return {"text": np.array(texts, dtype=object), "label": ids % 2}

    return (
        ray.data.range(rows, override_num_blocks=max(4, rows // 10_000))
        .map_batches(gen)
        .materialize()
    )


class Tokenize:
    """A user collate_fn: split + hash each word, pad to 64 (pure Python per row)."""

    def __init__(self, length: int = 64) -> None:
        self.length = length

    def __call__(self, table: Any) -> dict[str, Any]:
        import torch

        out = torch.zeros((table.num_rows, self.length), dtype=torch.int64)
        mask = torch.zeros((table.num_rows, self.length), dtype=torch.bool)
        rows = [
            [zlib.crc32(w.encode()) % _VOCAB for w in s.split()][: self.length]
            for s in table.column("text").to_pylist()
        ]
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        label = torch.from_numpy(table.column("label").to_numpy().copy())
        return {"ids": out, "mask": mask, "label": label}


WORKLOADS = {  # name: (build, rows, batch size, collate_fn or None for the default)
    "images": (images, 60_000, 256, None),
    "text": (text, 100_000, 512, Tokenize()),
}


# -- loaders --------------------------------------------------------------------------------
def make_loader(kind: str, ds: Any, batch_size: int, collate_fn: Any) -> trd.RayIterableDataset:
    if kind == "local":
        transport: Any = "local"
    elif kind == "nixl":
        transport = NixlTransport()
    elif kind == "nixl-copy":
        transport = NixlTransport(copy=True)
    else:
        raise ValueError(kind)
    return trd.RayIterableDataset(
        ds, batch_size=batch_size, num_workers=2, transport=transport, collate_fn=collate_fn
    )


def run_epoch(loader: trd.RayIterableDataset) -> dict[str, float]:
    gc.collect()
    transport = loader.transport
    read0 = getattr(transport, "bytes_read", 0)
    cpu0, t0 = _cpu(), time.perf_counter()
    it = iter(loader)
    first = None
    rows = 0
    touch = 0
    for batch in it:
        if first is None:
            first = time.perf_counter()
            cpu_first = _cpu()
        t = next(iter(batch.values()))
        touch += int(t.view(-1)[0])  # touch every batch, as a step would
        rows += len(t)
        del batch, t
    end, cpu1 = time.perf_counter(), _cpu()
    st = loader.stats()
    first_rows = st.rows / max(1, st.batches)
    out = {
        "rows": rows,
        "rows_s": rows / (end - t0),
        "steady_rows_s": (rows - first_rows) / max(1e-9, end - first),
        "first_s": first - t0,
        "cpu_per_1k": (cpu1 - cpu0) / rows * 1000,
        "steady_cpu_per_1k": (cpu1 - cpu_first) / max(1.0, rows - first_rows) * 1000,
    }
    read = getattr(transport, "bytes_read", 0) - read0
    if read:
        out["read_gbs"] = read / 1e9 / max(1e-9, st.stage_seconds["finalize"])
        out["read_bytes"] = read
    return out


# -- raw NIXL READs ---------------------------------------------------------------------------
def _read_rate(
    agent: Any, remote: str, src_addr: int, nbytes: int, in_flight: int, reps: int
) -> float:
    """GB/s of ``reps`` rounds of ``in_flight`` READs of ``nbytes`` each, posted together."""
    dsts = [np.empty(nbytes, np.uint8) for _ in range(in_flight)]
    for d in dsts:
        d[:] = 0
        agent.register_memory([(d.ctypes.data, nbytes, 0, "")], "DRAM")
    remote_descs = agent.get_xfer_descs([(src_addr, nbytes, 0)], "DRAM")

    def round_() -> None:
        hs = []
        for d in dsts:
            local = agent.get_xfer_descs([(d.ctypes.data, nbytes, 0)], "DRAM")
            h = agent.initialize_xfer("READ", local, remote_descs, remote, b"raw")
            agent.transfer(h)
            hs.append(h)
        for h in hs:
            while (state := agent.check_xfer_state(h)) == "PROC":
                pass
            assert state == "DONE", state
            h.release()

    round_()  # connect
    t0 = time.perf_counter()
    for _ in range(reps):
        round_()
    return reps * in_flight * nbytes / 1e9 / (time.perf_counter() - t0)


def _progress(agent: Any, stop: Any, interval: float = 0.0005) -> None:
    """Progress a source agent as the collate actors do (a polling thread, NIXL's own
    progress thread off: it spins)."""
    while not stop.wait(interval):
        agent.get_new_notifs()


def _source_agent(name: str, nbytes: int) -> tuple[Any, np.ndarray, Any]:
    import threading

    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    stop = threading.Event()
    threading.Thread(target=_progress, args=(agent, stop), daemon=True).start()
    return agent, buf, stop


class _Source:
    """A registered source buffer in a Ray actor, progressed like a collate actor."""

    def __init__(self, nbytes: int) -> None:
        logging.getLogger("nixl").setLevel(logging.WARNING)
        self.agent, self.buf, self.stop = _source_agent("bench-src", nbytes)

    def info(self) -> tuple[bytes, int]:
        return self.agent.get_agent_metadata(), int(self.buf.ctypes.data)


def raw_reads(nbytes: int, in_flight: int, reps: int) -> dict[str, float]:
    from nixl._api import nixl_agent, nixl_agent_config

    out = {}
    # Two agents in this process.
    src_agent, src, stop = _source_agent("bench-local-src", nbytes)
    init = nixl_agent("bench-init", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    init.add_remote_agent(src_agent.get_agent_metadata())
    out["raw_1proc_gbs"] = _read_rate(
        init, "bench-local-src", src.ctypes.data, nbytes, in_flight, reps
    )
    # From a Ray actor (another process), as the pipeline does.
    actor = ray.remote(_Source).options(num_cpus=0.25).remote(nbytes)
    md, addr = ray.get(actor.info.remote())
    init.add_remote_agent(md)
    out["raw_2proc_gbs"] = _read_rate(init, "bench-src", addr, nbytes, in_flight, reps)
    ray.kill(actor)
    stop.set()
    # memcpy of the same bytes, for scale.
    dst = np.empty(nbytes, np.uint8)
    dst[:] = 0
    t0 = time.perf_counter()
    for _ in range(reps * in_flight):
        np.copyto(dst, src)
    out["memcpy_gbs"] = reps * in_flight * nbytes / 1e9 / (time.perf_counter() - t0)
    return out


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="small and once: checks it runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument(
        "--raw-only", action="store_true", help="only the raw READs (3.15 MB and 0.30 MB)"
    )
    args = p.parse_args()
    reps = 1 if args.smoke else args.repeats
    ray.init(  # a fresh local instance, whatever else runs on this machine
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    kinds = ["local", "nixl", "nixl-copy"]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    batch_bytes: dict[str, float] = {}
    if args.raw_only:
        batch_bytes = {"images": 3_147_776, "text": 295_936}
    for name in [] if args.raw_only else args.workloads.split(","):
        make, rows, bs, collate_fn = WORKLOADS[name]
        if args.smoke:
            rows //= 10
        log(f"[{name}] building {rows} rows ...")
        ds = make(rows)
        loaders = {k: make_loader(k, ds, bs, collate_fn) for k in kinds}
        for k, loader in loaders.items():  # warm-up (untimed)
            log(f"[{name}] warm-up {k}")
            run_epoch(loader)
        for r in range(reps):
            for k, loader in loaders.items():
                res = run_epoch(loader)
                results.setdefault((name, k), []).append(res)
                log(f"[{name}] {k} #{r}: " + ", ".join(f"{a}={b:.4g}" for a, b in res.items()))
                if "read_bytes" in res:
                    batch_bytes[name] = res["read_bytes"] / (res["rows"] / bs)
        for loader in loaders.values():
            loader.close()
        del ds, loaders
    raw = {}
    for name, nbytes in batch_bytes.items():
        log(f"[raw] READs of {nbytes / 1e6:.2f} MB ...")
        raw[name] = raw_reads(int(nbytes), in_flight=4, reps=5 if args.smoke else 50)
    report(results, raw)
    ray.shutdown()


def _med(xs: list[dict[str, float]], key: str) -> float:
    vals = [x[key] for x in xs if key in x]
    return statistics.median(vals) if vals else float("nan")


def report(
    results: dict[tuple[str, str], list[dict[str, float]]], raw: dict[str, dict[str, float]]
) -> None:
    cols = ["rows_s", "steady_rows_s", "first_s", "cpu_per_1k", "steady_cpu_per_1k", "read_gbs"]
    print(f"\n{'workload':9} {'loader':10} " + " ".join(f"{c:>17}" for c in cols) + "   (medians)")
    for (name, k), xs in results.items():
        print(f"{name:9} {k:10} " + " ".join(f"{_med(xs, c):17.4g}" for c in cols))
    print("\nratios nixl / local (medians):")
    for name in {n for n, _ in results}:
        loc = results.get((name, "local"))
        for k in ("nixl", "nixl-copy"):
            rem = results.get((name, k))
            if not loc or not rem:
                continue
            parts = [
                f"{c} x{_med(rem, c) / _med(loc, c):.2f}"
                for c in ("rows_s", "steady_rows_s", "cpu_per_1k", "steady_cpu_per_1k")
            ]
            print(f"  {name:9} {k:10} " + ", ".join(parts))
    print("\nraw NIXL READ (4 in flight) of one batch's bytes, GB/s:")
    for name, r in raw.items():
        pipe = _med(results.get((name, "nixl"), []), "read_gbs")
        print(
            f"  {name:9} 1 process {r['raw_1proc_gbs']:.2f}, from a Ray actor {r['raw_2proc_gbs']:.2f}, "
            f"memcpy {r['memcpy_gbs']:.2f}; pipeline {pipe:.2f} "
            f"(= x{pipe / r['raw_2proc_gbs']:.2f} of raw from an actor)"
        )


if __name__ == "__main__":
    main()
