"""Stage 1's hooks in each Ray executor it starts (part of ``source.py``'s Ray-internals
boundary; what they rely on is listed and pinned there).

Owns: the hold policy (``_Hold``: a prestarted epoch's byte budget, the pause of idle
scheduling steps), the step counter (``_StepCounter``), sizing an executor's limits to
the cluster (``_size_to_cluster``) and the quiet early-stop teardown (``_quiesce``, with
its process-wide ``teardown_counts``). Does not own starting or iterating epochs
(``source.EpochBlocks``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

from .constants import IDLE_STEP_WAIT, TEARDOWN_POLL, TEARDOWN_WAIT

__all__ = ["teardown_counts"]

logger = logging.getLogger(__name__)

# How early stops ended, process-wide: "quiet" (no task was running when the executor
# shut down, so Ray cancelled nothing) or "cancelled" (tasks still ran after
# TEARDOWN_WAIT; Ray cancels them). Read by tests and the stress script.
_TEARDOWNS = {"quiet": 0, "cancelled": 0}
_TEARDOWNS_LOCK = threading.Lock()


def teardown_counts() -> dict[str, int]:
    """How this process's early-stopped epochs were torn down so far (a copy)."""
    with _TEARDOWNS_LOCK:
        return dict(_TEARDOWNS)


class _Hold:
    """Our backpressure policy on one executor (Ray calls it on its scheduling thread).

    ``budget`` None: no effect. An int: no operator starts a new task while the bytes
    waiting in the executor's output queue (produced, not yet taken by us) are at or
    above it; 0 therefore stops every new task. Running tasks are never touched.
    """

    name = "torch_raydata.hold"

    def __init__(self, executor: Any) -> None:
        self._output_op = executor._output_node[0]
        self.budget: int | None = None
        self.steps = _StepCounter(self.pace)
        self._wake = threading.Condition()
        self._woken = False

    def wake(self) -> None:
        """Something that can change the scheduling loop's decisions happened on our side
        (a block taken, the hold lifted, an early stop): end a paused step now."""
        with self._wake:
            self._woken = True
            self._wake.notify_all()

    def pace(self, executor: Any) -> None:
        """End of one scheduling step (Ray's thread): when no task of the executor runs,
        pause up to ``IDLE_STEP_WAIT`` or until :meth:`wake`.

        Ray's loop waits for its running tasks (``ray.wait``, 0.1 s), but with none
        running (a prestarted epoch at its byte budget, or a pipeline ahead of a slow
        step) it steps again at once, thousands of times a second, each step taking the
        trainer's GIL. Measured on the demo with a prestarted epoch waiting: 20% of the
        trainer process's samples in Ray's scheduling threads, and a 3x slower fit."""
        if executor._shutdown:
            return
        try:
            if any(op.get_active_tasks() for op in list(executor._topology)):
                return
        except Exception:  # noqa: BLE001 - unknown: never pause
            return
        with self._wake:
            if not self._woken:
                self._wake.wait(IDLE_STEP_WAIT)
            self._woken = False

    def queued_bytes(self) -> int:
        return int(self._output_op.metrics.num_external_outqueue_bytes)

    def can_add_input(self, op: Any) -> bool:
        budget = self.budget
        return budget is None or self.queued_bytes() < budget

    def max_task_output_bytes_to_read(self, op: Any) -> int | None:
        return None  # running tasks may always hand their outputs on (so they can finish)


class _StepCounter(ExecutionCallback):
    """Counts the executor's finished scheduling steps (Ray calls ``on_execution_step`` on
    its scheduling thread at the end of each), so that :func:`_quiesce` can wait for the
    step that was under way when the hold closed: that step may have passed our policy
    before the close and dispatch its task after we looked at the running ones."""

    def __init__(self, after_step: Callable[[Any], None] | None = None) -> None:
        self.count = 0
        self.cond = threading.Condition()
        self._after_step = after_step

    def on_execution_step(self, executor: Any) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify_all()
        if self._after_step is not None:
            self._after_step(executor)


def _size_to_cluster(executor: Any) -> None:
    """Size the executor's resource limits to the cluster from its first step.

    Ray 2.60 sizes each executor's limits (CPU, object store) from what its cluster
    autoscaler reserved for it on Ray Data's autoscaling coordinator actor: an
    asynchronous call whose answer is empty at the executor's start (limits zero; they
    are re-read once a second), and, while two executors run (an epoch and the next one
    prestarted), the leftover CPUs split between them (1 of 2 here). Measured on W7: the
    fused read+map got a zero budget for ~1.5 s at every epoch start, one task ran on
    the liveness rule. Each limit here is the larger of that reservation and the
    cluster's resources (what Ray Data used before the coordinator; Ray still places
    every task within the cluster's real resources). Set after ``_execute_dag`` built
    the resource manager: the first step may already have read the zero limits, so the
    next read refreshes them."""
    from ray.data._internal.execution.interfaces import ExecutionResources

    manager = executor._resource_manager
    reserved = manager._get_total_resources

    def total() -> Any:
        cluster = ExecutionResources.from_resource_dict(ray.cluster_resources())
        return reserved().max(cluster)

    manager._get_total_resources = total
    manager._global_limits_last_update_time = 0


def _quiesce(executor: Any, hold: _Hold) -> None:
    """Let an executor's running tasks finish before it is shut down.

    Ray's shutdown cancels running tasks, and in Ray 2.60 a task that completes while it
    is being cancelled can trip a check in the driver's task manager that aborts the
    whole process (``Check failed: it != submissible_tasks_.end()``, ray-project/ray
    PRs 54527 / 54798; seen in about 1 of 13 early-stop runs here). So: no new task from
    now on (our hold policy at 0, and no "liveness" task either), wait up to
    ``TEARDOWN_WAIT`` for the running ones (the scheduling loop keeps taking their
    outputs, so streaming tasks run to their end), then the shutdown has nothing to
    cancel. Tasks still running after the bound are cancelled as before.
    """
    if executor._shutdown:
        return
    steps = hold.steps
    with steps.cond:
        hold.budget = 0
        executor._consumer_idling = lambda: False
        closed_at = steps.count
    topology = executor._topology
    deadline = time.perf_counter() + TEARDOWN_WAIT

    def settled() -> bool:
        # The step under way when the hold closed has ended (its dispatches, if any, are
        # among the running tasks now; later steps dispatch nothing), or the scheduling
        # loop has ended; and no task runs.
        if steps.count <= closed_at and executor.is_alive():
            return False
        return not any(op.num_active_tasks() for op in list(topology))

    while not settled():
        if time.perf_counter() > deadline:
            with _TEARDOWNS_LOCK:
                _TEARDOWNS["cancelled"] += 1
            logger.warning(
                "torch_raydata: %d s after an early stop Ray tasks still run; cancelling them",
                TEARDOWN_WAIT,
            )
            return
        with steps.cond:  # woken by each scheduling step; tasks end within a step
            steps.cond.wait(TEARDOWN_POLL)
    with _TEARDOWNS_LOCK:
        _TEARDOWNS["quiet"] += 1
