"""A node of a 3-node cluster dies mid-epoch (run by tests/faults/test_node_loss.py in a
subprocess, so its cluster does not clash with the test session's ``ray.init``).

    python node_loss_script.py OUT.json

Head (the driver's node, no CPUs for tasks) + two worker nodes with one CPU each; the
``map_batches`` tasks run on the workers, so blocks live in their object stores (the
dataset is materialized there first). After the training step has taken a few batches,
the worker node ``w1`` is removed. Writes what the
training step saw to OUT.json: ``{"outcome": "complete", "ids": [...]}`` or
``{"outcome": "error", "type", "message", "notes"}``, plus timings and how many blocks
were only on w1 (lost with it) when it was removed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import torch_raydata as trd  # noqa: E402

ROWS, BLOCKS, BATCH = 6000, 30, 100
STORE = 100 * 1024 * 1024


def payload(b):
    ids = b["id"]
    return {"id": ids, "x": np.broadcast_to(ids[:, None] % 251, (len(ids), 1024)).astype(np.uint8)}


def main() -> None:
    out = sys.argv[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": STORE,
            "include_dashboard": False,
            # Notice the dead node in ~1 s rather than ~15 s (the defaults).
            "_system_config": {"health_check_period_ms": 200, "health_check_failure_threshold": 3},
        },
    )
    w1 = cluster.add_node(num_cpus=1, object_store_memory=STORE, resources={"w1": 1})
    cluster.add_node(num_cpus=1, object_store_memory=STORE, resources={"w2": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    ray.data.DataContext.get_current().enable_progress_bars = False
    report: dict = {"nodes": len(ray.nodes())}

    # Materialized first: every block sits in a worker node's object store before the epoch
    # starts, so removing w1 certainly loses blocks not consumed yet (counted below).
    ds = ray.data.range(ROWS, override_num_blocks=BLOCKS).map_batches(payload, batch_size=None)
    ds = ds.materialize()
    refs = [e.ref for bundle in ds.iter_internal_ref_bundles() for e in bundle.blocks]
    report["blocks"] = len(refs)
    loader = trd.RayIterableDataset(ds, batch_size=BATCH, num_workers=2, prefetch_batches=2)
    ids: list[np.ndarray] = []
    t0 = time.monotonic()
    try:
        for i, b in enumerate(loader):
            assert (b["x"][:, 0].long() == b["id"] % 251).all()
            ids.append(b["id"].numpy())
            if i == 5:
                where = ray.experimental.get_object_locations(refs)
                report["blocks_only_on_w1"] = sum(
                    set(loc["node_ids"]) == {w1.node_id} for loc in where.values()
                )
                cluster.remove_node(w1, allow_graceful=False)
                report["removed_after_batches"] = i + 1
                report["removed_at"] = time.monotonic() - t0
        report["outcome"] = "complete"
    except Exception as e:  # noqa: BLE001 - the outcome under test
        report.update(
            outcome="error",
            type=f"{type(e).__module__}.{type(e).__name__}",
            message=str(e)[:2000],
            notes=list(getattr(e, "__notes__", [])),
        )
    report["seconds"] = time.monotonic() - t0
    report["ids"] = np.concatenate(ids).tolist() if ids else []
    report["threads"] = [t.name for t in threading.enumerate() if t.name.startswith("trd-")]
    loader.close()
    del refs
    with open(out, "w") as f:
        json.dump(report, f)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
