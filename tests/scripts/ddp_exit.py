"""Rank 0 exits while rank 1 still uses Ray (tests/test_distributed.py; not a test module).

torchrun, 2 ranks. Rank 0 starts the run's Ray (``trd.distributed.init_ray``) and returns
right after a barrier. Rank 1 waits until rank 0 has reached its exit -- it either logs
that it waits for the other drivers (torch_raydata's exit wait) or its process is gone --
and only then uses Ray: a task round trip and a put/get. It writes ``<out>/rank1.json``
and returns. The order comes from events (a file rank 0's log handler writes, rank 0's
process ending), not from sleeps.

    torchrun --standalone --nproc_per_node=2 ddp_exit.py OUT

Without the exit wait, rank 0 takes Ray down with it and rank 1 dies (exit code 1, Ray's
"lost objects") or its ``ray.get`` times out.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch.distributed as dist  # noqa: E402

import torch_raydata as trd  # noqa: E402

WAIT = 120.0  # bound on rank 1's wait for rank 0's exit (seconds)


class _Signal(logging.Handler):
    """Writes ``path`` when torch_raydata logs that it waits for the other drivers."""

    def __init__(self, path: str) -> None:
        super().__init__(logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting up to" in record.getMessage():
            with open(self.path, "w") as f:
                f.write(record.getMessage())


def _alive(pid: int) -> bool:
    """The process exists and is no zombie (torchrun reaps its workers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    trd.distributed.init_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)
    import ray

    signal = os.path.join(out, "rank0_waiting")
    if rank == 0:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # to stderr
        log = logging.getLogger("torch_raydata.distributed.cluster")
        log.setLevel(logging.INFO)
        log.addHandler(_Signal(signal))
        with open(os.path.join(out, "rank0.pid"), "w") as f:
            f.write(str(os.getpid()))
    dist.barrier()  # rank 1 is connected to Ray and knows rank 0's pid
    dist.destroy_process_group()
    if rank == 0:
        return  # exit now: rank 1 has not used Ray yet
    with open(os.path.join(out, "rank0.pid")) as f:
        pid0 = int(f.read())
    deadline = time.monotonic() + WAIT
    while not os.path.exists(signal) and _alive(pid0):
        if time.monotonic() > deadline:
            raise SystemExit(f"rank 0 (pid {pid0}) neither exited nor waited within {WAIT} s")
        time.sleep(0.05)  # polls an event: rank 0's file or its process ending
    seen = "waiting" if os.path.exists(signal) else "gone"

    @ray.remote(num_cpus=0)
    def square(x: int) -> int:
        return x * x

    got = ray.get([square.remote(i) for i in range(4)], timeout=60)
    got.append(ray.get(ray.put(7), timeout=60))
    with open(os.path.join(out, "rank1.json"), "w") as f:
        json.dump({"rank0": seen, "got": got}, f)


if __name__ == "__main__":
    main()
