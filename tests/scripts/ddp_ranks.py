"""One rank of a torchrun job for tests/test_distributed.py (not a test module itself).

Every rank runs this file (torchrun --nproc_per_node=2). It attaches to one Ray cluster
(RAY_ADDRESS when set, else rank 0 starts one), builds the same Ray Datasets, iterates
each for a few epochs through ``DataLoader(RayIterableDataset(...), batch_size=None)`` and
writes what it saw (row IDs per epoch, batch sizes, len(), stats) to
``<out>/rank<r>.json`` for the test to check across ranks.

    torchrun --standalone --nproc_per_node=2 ddp_ranks.py OUT [--rows 1001] [--epochs 2] [--slow-rank 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import torch_raydata as trd  # noqa: E402

# (name, RayIterableDataset options, whether Ray knows the row count)
SCENARIOS = [
    ("known_shuffle", dict(batch_size=64, shuffle_buffer_size=200, shuffle_seed=7, num_workers=2), True),
    ("unknown_drop_last", dict(batch_size=64, drop_last=True, preserve_order=True, num_workers=2), False),
]


def build(rows: int, known: bool):
    import ray

    ds = ray.data.range(rows, override_num_blocks=9)
    if not known:  # a 1:1 map: Ray no longer knows the row count without executing
        ds = ds.map_batches(lambda b: {"id": b["id"], "x": b["id"] * 2}, batch_format="numpy")
    return ds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--rows", type=int, default=1001)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--slow-rank", type=int, default=None, help="this rank takes longer per step")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    address = trd.distributed.init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    report: dict = {"rank": rank, "address": address, "scenarios": {}}
    for name, options, known in SCENARIOS:
        ds = trd.RayIterableDataset(build(args.rows, known), **options)
        try:
            length = len(ds)
        except TypeError:
            length = None
        epochs = []
        for _ in range(args.epochs):
            ids, sizes = [], []
            for batch in DataLoader(ds, batch_size=None):
                ids.append(batch["id"].numpy())
                sizes.append(len(batch["id"]))
                if rank == args.slow_rank:  # a slower training step: the other rank ends first
                    time.sleep(0.02)
            st = ds.stats()
            epochs.append({
                "ids": np.concatenate(ids).tolist() if ids else [],
                "sizes": sizes,
                "rows_dropped": st.rows_dropped,
                "notes": list(st.notes),
            })
        report["scenarios"][name] = {"len": length, "epochs": epochs}
        ds.close()
        # Drop the dataset at once: the fast rank lets go of its shard while the slow rank
        # still reads its own (the split must outlive the fast rank's dataset).
        del ds
        gc.collect()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()  # no rank leaves (and takes Ray's split coordinator with it) early
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
