"""Many early stops of a streamed epoch in one process (the cancel/complete race probe).

Each round iterates a streamed dataset of many small map tasks and breaks out after the
first batch, while tasks are running and completing: the moment Ray 2.60's executor
shutdown (which cancels running tasks) can race a task's completion and abort the whole
process from C++ (``Check failed: it != submissible_tasks_.end()``). Exits 0 and prints
``OK <rounds>`` when every round ran, and how many running tasks Ray cancelled (the
crash's precondition; 0 expected, including the prestarted epoch discarded by the final
``close()``); a crash shows as a non-zero exit (SIGABRT) with no Python traceback.

    python tests/scripts/early_stop_stress.py [rounds]
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402

import torch_raydata as trd  # noqa: E402


def _work(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # A few ms of work per task, so that tasks complete all the time.
    t = time.perf_counter() + 0.003
    while time.perf_counter() < t:
        pass
    return batch


# Running tasks Ray cancelled at an executor shutdown: the crash needs one, so this counts
# its precondition (a crash itself is rare: a cancel must meet the task's completion).
_RAY_CANCELS = [0]


def _count_ray_cancels() -> None:
    from ray.data._internal.execution.interfaces import physical_operator as po

    cancel = po.PhysicalOperator._cancel_active_tasks

    def counted(self, force):  # type: ignore[no-untyped-def]
        _RAY_CANCELS[0] += len(self.get_active_tasks())
        return cancel(self, force)

    po.PhysicalOperator._cancel_active_tasks = counted


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    _count_ray_cancels()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.range(20_000, override_num_blocks=400).map_batches(_work, batch_size=None)
    loader = trd.RayIterableDataset(ds, batch_size=16, num_workers=2)
    for r in range(rounds):
        for i, _batch in enumerate(loader):
            if i == r % 3:  # break at the 1st, 2nd or 3rd batch
                break
    loader.close()
    ray.shutdown()
    try:  # how the early stops were torn down (absent before the quiet teardown)
        from torch_raydata.pipeline.source import teardown_counts

        counts = teardown_counts()
        print(f"teardowns quiet={counts['quiet']} cancelled={counts['cancelled']}")
    except ImportError:
        pass
    print(f"ray_cancels={_RAY_CANCELS[0]}")
    print(f"OK {rounds}", flush=True)


if __name__ == "__main__":
    main()
