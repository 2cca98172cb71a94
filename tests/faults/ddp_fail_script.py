"""One rank of a 2-rank DDP job in which one rank's data fails (run by
tests/faults/test_ddp_faults.py: one process per rank, env RANK/WORLD_SIZE/MASTER_*).

    python ddp_fail_script.py OUT_DIR --fail-rank R [--fail-batch K] [--late-rank L --late-seconds S]

Every rank: gloo process group, ``trd.distributed.init_ray`` (rank 0 starts Ray), a DDP
model whose backward all-reduces gradients every step (the collective a failing peer
would hang), ``DataLoader(RayIterableDataset(...), batch_size=None)``. Rank ``R``'s
collate_fn raises at its batch ``K``. Rank ``L`` arrives late (sleeps S s) at the split,
so the other rank waits there and logs the straggler line. Each rank writes
``OUT_DIR/rank<r>.json``: the outcome (``completed`` or ``error`` with type, message,
notes), steps done, and seconds from its last step to the error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import torch_raydata as trd  # noqa: E402


class DataFault(RuntimeError):
    pass


class FailingCollate:
    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.calls = 0
        self.inner = trd.collate.DefaultCollate()

    def __call__(self, table):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise DataFault(f"rank {dist.get_rank()}: corrupt record in batch {self.calls - 1}")
        return self.inner(table)


COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--fail-rank", type=int, required=True)
    p.add_argument("--fail-batch", type=int, default=3)
    p.add_argument("--late-rank", type=int, default=None)
    p.add_argument("--late-seconds", type=float, default=0.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    # The collectives' timeout is far beyond the test's deadline for the whole run, so a
    # collective can only end in an error because the peer's exit closed its connection
    # (what the test checks), never by waiting out this timeout; a hang is the deadline.
    t0 = time.monotonic()
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    rank = dist.get_rank()
    report: dict = {"rank": rank, "steps": 0, "t_group": time.monotonic() - t0}
    out = os.path.join(args.out, f"rank{rank}.json")
    last_step = time.monotonic()
    try:
        trd.distributed.init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        report["t_ray"] = time.monotonic() - t0
        ds = ray.data.range(4000, override_num_blocks=8)
        fail_at = args.fail_batch if rank == args.fail_rank else None
        loader = trd.RayIterableDataset(
            ds, batch_size=50, num_workers=2, preserve_order=True, collate_fn=FailingCollate(fail_at)
        )
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)
        if rank == args.late_rank:
            time.sleep(args.late_seconds)  # a straggler: the others wait for it at the split
        for batch in DataLoader(loader, batch_size=None):
            opt.zero_grad()
            model(batch["id"].float()[:, None]).sum().backward()  # all-reduce: a collective
            opt.step()
            report["steps"] += 1
            last_step = time.monotonic()
            report.setdefault("t_first_step", last_step - t0)
        report["outcome"] = "completed"
    except Exception as e:  # noqa: BLE001 - the outcome under test
        report.update(
            outcome="error",
            type=type(e).__name__,
            message=str(e)[:1500],
            notes=list(getattr(e, "__notes__", [])),
            seconds_after_last_step=time.monotonic() - last_step,
        )
    report["t_report"] = time.monotonic() - t0
    with open(out, "w") as f:
        json.dump(report, f)
    # As a training script that raised would: exit (Python's normal exit path, atexit
    # handlers included); the peers' next collective then fails instead of hanging.
    sys.exit(0 if report["outcome"] == "completed" else 1)


if __name__ == "__main__":
    main()
