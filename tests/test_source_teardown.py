"""Stage 1's hooks in Ray's executor against a fake executor, no Ray: the early-stop
teardown (``source_executor._quiesce``) and the pause of idle scheduling steps (``_Hold.pace``).

Ray's executor shutdown cancels running tasks, and a cancel that meets a task's
completion aborts the process (see ``source_executor._quiesce``). The quiesce must therefore not
let the shutdown go ahead while a task runs, including one dispatched by a scheduling
step that passed our hold policy just before the hold closed.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from torch_raydata.pipeline import source, source_executor
from torch_raydata.pipeline.source_executor import _Hold, _quiesce, teardown_counts

WAIT = 30  # bound on every event wait: a broken quiesce fails, never hangs


class _Op:
    def __init__(self, looked: threading.Event) -> None:
        self.tasks = 0
        self.dispatched = 0
        self.looked = looked
        self.polled_busy = threading.Event()  # detector: quiesce saw a running task

    def num_active_tasks(self) -> int:
        self.looked.set()
        if self.tasks:
            self.polled_busy.set()
        return self.tasks

    def get_active_tasks(self) -> list[str]:
        return [f"task {i}" for i in range(self.tasks)]


class _Executor:
    """The attributes ``_Hold`` and ``_quiesce`` read, plus a scheduling loop we drive."""

    def __init__(self) -> None:
        self.looked = threading.Event()  # detector: quiesce looked at the executor
        self.op = _Op(self.looked)
        self._shutdown = False
        out = SimpleNamespace(metrics=SimpleNamespace(num_external_outqueue_bytes=0))
        self._output_node = (out, None)
        self._topology = {self.op: None}
        self._consumer_idling = lambda: True
        self.alive = True

    def is_alive(self) -> bool:
        self.looked.set()
        return self.alive


def _run_quiesce(executor: _Executor, hold: _Hold) -> tuple[threading.Thread, list[str]]:
    log: list[str] = []

    def run() -> None:
        _quiesce(executor, hold)
        op = executor.op
        log.append(f"returned after {op.dispatched} dispatched, {op.tasks} running")

    t = threading.Thread(target=run, name="test-quiesce")
    t.start()
    return t, log


def test_waits_for_the_task_of_a_step_that_passed_the_hold_before_it_closed():
    executor = _Executor()
    hold = _Hold(executor)
    before = teardown_counts()
    # The scheduling thread is inside a step: our policy let an operator in (the hold was
    # still open) and the step has not dispatched the task yet.
    assert hold.can_add_input(executor.op)
    quiesce, log = _run_quiesce(executor, hold)
    assert executor.looked.wait(WAIT)
    assert quiesce.is_alive(), log  # no task runs yet, but the step is not over
    assert hold.budget == 0 and executor._consumer_idling() is False
    # The step dispatches its task and ends.
    executor.op.tasks = executor.op.dispatched = 1
    hold.steps.on_execution_step(executor)
    assert executor.op.polled_busy.wait(WAIT)
    assert quiesce.is_alive(), log  # the new task runs: still no shutdown
    # Later steps dispatch nothing (the hold is closed); the task completes.
    assert not hold.can_add_input(executor.op)
    executor.op.tasks = 0
    hold.steps.on_execution_step(executor)
    quiesce.join(WAIT)
    assert not quiesce.is_alive()
    assert log == ["returned after 1 dispatched, 0 running"]
    after = teardown_counts()
    assert after["quiet"] == before["quiet"] + 1 and after["cancelled"] == before["cancelled"]


def test_an_ended_scheduling_loop_needs_no_further_step():
    executor = _Executor()
    executor.alive = False  # the executor produced everything; its loop has returned
    quiesce, log = _run_quiesce(executor, _Hold(executor))
    quiesce.join(WAIT)
    assert log == ["returned after 0 dispatched, 0 running"]


def test_a_task_still_running_after_the_bound_is_left_to_the_shutdown(monkeypatch):
    monkeypatch.setattr(source_executor, "TEARDOWN_WAIT", 0.0)
    executor = _Executor()
    executor.op.tasks = 1
    before = teardown_counts()
    _quiesce(executor, _Hold(executor))
    assert teardown_counts()["cancelled"] == before["cancelled"] + 1


def test_an_executor_already_shut_down_is_left_alone():
    executor = _Executor()
    executor._shutdown = True
    hold = _Hold(executor)
    _quiesce(executor, hold)
    assert hold.budget is None and not executor.looked.is_set()


class _CountingCondition(threading.Condition):
    """Records the timeout of every wait (a detector: which steps paused)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return super().wait(timeout)


def _until_paused(cond: _CountingCondition, timeout: float) -> None:
    """Detector: a step is waiting on ``cond`` with ``timeout`` (its wait() released the
    lock, so holding it here means the step is inside the wait). Bounded by WAIT."""
    with cond:
        for _ in range(WAIT * 100):
            if timeout in cond.waits:
                return
            cond.wait(0.01)
    raise AssertionError("the scheduling step never paused")


def _paced_hold(executor: _Executor) -> tuple[_Hold, _CountingCondition]:
    hold = _Hold(executor)
    cond = hold._wake = _CountingCondition()
    return hold, cond


def test_an_idle_scheduling_step_pauses_and_a_busy_one_does_not(monkeypatch):
    """Ray's loop waits for running tasks itself; with none it would step again at once
    (each step takes the trainer's GIL), so a step ending with no task running pauses."""
    monkeypatch.setattr(source_executor, "IDLE_STEP_WAIT", 0.001)
    executor = _Executor()
    hold, cond = _paced_hold(executor)
    executor.op.tasks = 1
    hold.steps.on_execution_step(executor)
    assert cond.waits == [] and hold.steps.count == 1  # a task runs: Ray's ray.wait paces
    executor.op.tasks = 0
    hold.steps.on_execution_step(executor)
    assert cond.waits == [0.001] and hold.steps.count == 2  # counted before the pause
    executor._shutdown = True
    hold.steps.on_execution_step(executor)
    assert cond.waits == [0.001]  # shutting down: the loop must end, no pause


def test_a_wake_ends_the_pause_and_one_that_came_first_skips_it(monkeypatch):
    monkeypatch.setattr(source_executor, "IDLE_STEP_WAIT", 3600.0)  # only a wake can end it
    executor = _Executor()
    hold, cond = _paced_hold(executor)
    hold.wake()  # e.g. a block was taken while the step ran
    hold.steps.on_execution_step(executor)
    assert cond.waits == []  # not paused: the step's view may be stale
    done = threading.Event()

    def step() -> None:
        hold.steps.on_execution_step(executor)
        done.set()

    t = threading.Thread(target=step, name="test-step")
    t.start()
    _until_paused(cond, 3600.0)
    assert not done.is_set()
    hold.wake()
    assert done.wait(WAIT)
    t.join(WAIT)


def test_release_and_close_wake_a_paused_step(monkeypatch):
    monkeypatch.setattr(source_executor, "IDLE_STEP_WAIT", 3600.0)
    for end in ("release", "close"):
        executor = _Executor()
        executor.alive = False  # (close: nothing to quiesce)
        executor.shutdown = lambda force: None
        hold, cond = _paced_hold(executor)
        blocks = source.EpochBlocks(iter(()), executor, hold=hold)
        t = threading.Thread(target=hold.steps.on_execution_step, args=(executor,))
        t.start()
        _until_paused(cond, 3600.0)
        blocks.release() if end == "release" else blocks.close()
        t.join(WAIT)
        assert not t.is_alive(), end
