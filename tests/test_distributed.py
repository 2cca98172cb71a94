"""Distributed: 2 ranks under torchrun (gloo, CPU) on one Ray; equal steps; the cap.

The torchrun test starts its own Ray from rank 0 (the init_ray broadcast path); the rest
run in this process, without torch.distributed.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

import torch_raydata as trd
from torch_raydata import distributed
from torch_raydata.collate import DefaultCollate
from torch_raydata.distributed import sharding
from torch_raydata.pipeline.run import EpochRun, PipelineConfig
from torch_raydata.pipeline.stats import StatsRecorder
from torch_raydata.transports import LocalTransport

from .fakes import make_blocks, source_of

SCRIPT = Path(__file__).parent / "scripts" / "ddp_ranks.py"
EXIT_SCRIPT = Path(__file__).parent / "scripts" / "ddp_exit.py"


def _run_torchrun(script: Path, out: Path, *args: str, timeout: float = 240) -> Path:
    """``script OUT *args`` on 2 ranks; fails the test with each rank's stderr unless the
    run succeeds. Returns the directory of the ranks' logs."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this checkout's package
    logs = out / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(logs), "--redirects", "3", str(script), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:  # each rank's own stderr, then torchrun's
        ranks = "".join(
            f"\n--- {f.relative_to(logs)}:\n{f.read_text()[-6000:]}"
            for f in sorted(logs.rglob("stderr.log"))
        )
        pytest.fail(f"torchrun failed ({proc.returncode}):{ranks}\n--- torchrun:\n{proc.stderr[-3000:]}")
    return logs


def _torchrun(out: Path, *args: str, timeout: float = 240) -> list[dict]:
    _run_torchrun(SCRIPT, out, *args, timeout=timeout)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_every_row_once_and_equal_batches(tmp_path):
    ranks = _torchrun(tmp_path, "--rows", "1001", "--epochs", "2", "--slow-rank", "1")
    assert ranks[0]["address"] == ranks[1]["address"]  # one Ray cluster, started by rank 0

    # Known row count, local shuffle: 1001 rows -> 500 per rank (1 left out by the equal
    # split, counted on rank 0) -> ceil(500 / 64) = 8 batches on each rank, each epoch.
    known = [r["scenarios"]["known_shuffle"] for r in ranks]
    assert [k["len"] for k in known] == [8, 8]
    for epoch in range(2):
        e0, e1 = known[0]["epochs"][epoch], known[1]["epochs"][epoch]
        assert len(e0["sizes"]) == len(e1["sizes"]) == 8
        ids = e0["ids"] + e1["ids"]
        assert len(ids) == len(set(ids)) == 1000  # every row not dropped: exactly once
        assert set(ids) <= set(range(1001))
        assert (e0["rows_dropped"], e1["rows_dropped"]) == (1, 0)
        assert any("streaming_split(2, equal=True)" in n for n in e0["notes"])
    assert known[0]["epochs"][0]["ids"] != known[0]["epochs"][1]["ids"]  # reshuffled

    # Row count unknown to Ray (after map_batches), drop_last: still equal steps. The
    # split's one left-out row cannot be counted without the total; drop_last's can.
    unknown = [r["scenarios"]["unknown_drop_last"] for r in ranks]
    assert [u["len"] for u in unknown] == [None, None]
    for epoch in range(2):
        e0, e1 = unknown[0]["epochs"][epoch], unknown[1]["epochs"][epoch]
        assert e0["sizes"] == e1["sizes"] == [64] * 7
        ids = e0["ids"] + e1["ids"]
        assert len(ids) == len(set(ids)) == 896
        assert e0["rows_dropped"] == e1["rows_dropped"] == 500 - 448
        assert len(ids) + e0["rows_dropped"] + e1["rows_dropped"] == 1001 - 1
        assert e0["ids"] == sorted(e0["ids"])  # preserve_order within the shard


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rank0_exit_keeps_ray_up_until_the_other_rank_left(tmp_path):
    """Rank 0 started Ray and returns while rank 1 has not used it yet; rank 1 uses Ray
    only once rank 0 is at its exit (scripts/ddp_exit.py orders this by events). Rank 0's
    exit waits for rank 1's driver to disconnect, so rank 1's tasks run and both ranks
    end with exit code 0 (without the wait: rank 1 loses the cluster and exits 1)."""
    logs = _run_torchrun(EXIT_SCRIPT, tmp_path)
    assert json.loads((tmp_path / "rank1.json").read_text()) == {
        "rank0": "waiting", "got": [0, 1, 4, 9, 7],
    }
    rank0_log = "".join(f.read_text() for f in logs.rglob("stderr.log") if "/0/" in str(f))
    assert "1 other driver(s)" in rank0_log and "TORCH_RAYDATA_EXIT_WAIT_SECONDS" in rank0_log


class _Clock:
    """A fake clock whose sleep advances it (the exit wait without real time)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _exit_wait(drivers, timeout=10.0):
    clock = _Clock()
    calls = []

    def list_drivers():
        calls.append(clock.now)
        step = drivers[min(len(calls), len(drivers)) - 1]
        if isinstance(step, Exception):
            raise step
        return step

    done = distributed.wait_for_other_drivers(
        timeout, list_drivers=list_drivers, poll=1.0, clock=clock, sleep=clock.sleep
    )
    return done, calls


def test_exit_wait_returns_at_once_without_other_drivers(caplog):
    with caplog.at_level("INFO", logger="torch_raydata.distributed.cluster"):
        assert _exit_wait([[]]) == (True, [0.0])
    assert not caplog.records  # nothing to wait for, nothing said


def test_exit_wait_ends_when_the_other_drivers_left(caplog):
    others = [("02000000", 41), ("03000000", 42)]
    with caplog.at_level("INFO", logger="torch_raydata.distributed.cluster"):
        done, calls = _exit_wait([others, others[1:], []])
    assert done and calls == [0.0, 1.0, 2.0]
    (info,) = caplog.records
    assert info.levelname == "INFO" and "2 other driver(s) (pids 41, 42)" in info.getMessage()
    assert "waiting up to 10 s" in info.getMessage()


def test_exit_wait_is_bounded_and_says_so(caplog, monkeypatch):
    from torch_raydata.distributed import cluster

    monkeypatch.setattr(cluster, "STRAGGLER_SECONDS", 3.0)
    with caplog.at_level("INFO", logger="torch_raydata.distributed.cluster"):
        done, calls = _exit_wait([[("02000000", 41)]], timeout=6.0)
    assert not done and calls == [float(t) for t in range(7)]  # polled until the bound
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [lv for lv, _ in levels] == ["INFO", "WARNING", "WARNING"]
    assert "waiting for 1 driver(s) (pids 41" in levels[1][1]  # after STRAGGLER_SECONDS
    assert "after waiting 6 s" in levels[2][1] and "lose it" in levels[2][1]


def test_exit_wait_survives_an_unreadable_job_table(caplog):
    with caplog.at_level("INFO", logger="torch_raydata.distributed.cluster"):
        done, calls = _exit_wait([[("02000000", 41)], ConnectionError("GCS gone")])
    assert not done and len(calls) == 2
    assert "could not read Ray's job table" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("ending", ["normal", "uncaught exception", "wait off", "ray down"])
def test_exit_hook_waits_only_after_a_normal_end(monkeypatch, caplog, ending):
    """An uncaught exception ends rank 0 at once: the other ranks may be blocked in a
    collective with it, and the launcher stops them only once it has exited."""
    import ray

    from torch_raydata.distributed import cluster

    waits = []
    monkeypatch.setattr(cluster, "wait_for_other_drivers", waits.append)
    monkeypatch.setattr(cluster, "_exit_wait", 0.0 if ending == "wait off" else 7.0)
    monkeypatch.setattr(ray, "is_initialized", lambda: ending != "ray down")
    if ending == "uncaught exception":
        monkeypatch.setattr(sys, "last_value", RuntimeError("step failed"), raising=False)
    else:
        monkeypatch.delattr(sys, "last_value", raising=False)
    cluster._wait_at_exit()
    assert waits == ([7.0] if ending == "normal" else [])
    if ending == "uncaught exception":
        assert "ends with an error" in caplog.text


def test_init_ray_rejects_a_negative_exit_wait():
    with pytest.raises(ValueError, match=r"exit_wait=-1 must be >= 0"):
        distributed.init_ray(exit_wait=-1)


def _epoch(sizes, max_batches, batch_size=10, skip=0):
    blocks, fetcher = source_of(make_blocks(sizes))
    return EpochRun(
        blocks, fetcher, DefaultCollate(), LocalTransport(),
        PipelineConfig(batch_size=batch_size, num_workers=2, prefetch_batches=2),
        stats=StatsRecorder(0), max_batches=max_batches, skip_batches=skip,
    )


def test_max_batches_drops_and_counts_the_rest():
    run = _epoch([25, 30, 17], max_batches=5)
    batches = list(run)
    assert len(batches) == 5
    s = run.stats.snapshot(0)
    assert s.rows == 50 and s.rows_dropped == 22
    assert s.buffered_batches == 0
    assert any("max_batches=5" in n for n in s.notes)


def test_max_batches_counts_skipped_batches():
    run = _epoch([40], max_batches=4, skip=1)
    assert len(list(run)) == 3


def test_exact_max_batches_is_a_normal_epoch():
    run = _epoch([25, 30, 17], max_batches=8)
    assert sum(len(b["id"]) for b in run) == 72
    assert run.stats.snapshot(0).rows_dropped == 0


def test_too_few_batches_raise_instead_of_hanging_the_other_ranks():
    run = _epoch([25], max_batches=4)
    with pytest.raises(RuntimeError, match=r"ended after 3 batches .* max_batches=4"):
        list(run)
    assert run.closed


def test_rank_source_sizes_per_rank(monkeypatch, ray_session):
    import ray

    monkeypatch.setattr(sharding, "world", lambda: (1, 2))
    ds = trd.RayIterableDataset(ray.data.range(1001), batch_size=64)
    assert ds.num_rows() == 500 and len(ds) == 8
    assert ds._source.max_batches(64, False) == 8
    assert ds._source.max_batches(64, True) == 7
    hinted = trd.RayIterableDataset(ray.data.range(10).map(lambda r: r), batch_size=4, num_rows=10)
    assert hinted.num_rows() == 5 and len(hinted) == 2
    # A DataIterator is never re-split: it is this rank's data as given.
    it = trd.RayIterableDataset(ray.data.range(10).iterator(), batch_size=4)
    assert it._source.max_batches(4, False) is None


def test_single_process_is_not_split(ray_session):
    import ray

    ds = trd.RayIterableDataset(ray.data.range(100), batch_size=30)
    assert len(ds) == 4 and ds._source.max_batches(30, False) is None
    assert sum(len(b["id"]) for b in ds) == 100
    assert ds._source.shard is None
    sh = distributed.shard(ray.data.range(10))
    assert (sh.world_size, sh.total_rows, sh.rows_per_rank, sh.rows_left_out) == (1, 10, 10, 0)


def test_hand_out_actor_lives_until_every_rank_released(ray_session):
    import ray

    holder = sharding._shard_holder_class().remote(ray.data.range(10), 2, False)
    shards = [ray.get(holder.get.remote(rank)) for rank in range(2)]
    assert all(type(s).__name__ == "StreamSplitDataIterator" for s in shards)
    done = []
    weakref.finalize(shards[0], done.append, 0)  # what shard() hooks the release on
    del shards[0]
    gc.collect()
    assert done == [0]
    sharding._release(holder, 0)  # the fast rank is done: the split stays for the other
    assert ray.get(holder.ready.remote())
    sharding._release(holder, 1)
    with pytest.raises(ray.exceptions.RayActorError):  # calls from one caller run in order
        ray.get(holder.ready.remote())


def test_init_ray_refuses_to_guess_under_a_launcher(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 .* init_process_group\(\) first"):
        distributed.init_ray()


def test_init_ray_keeps_a_connected_ray(ray_session):
    import ray

    assert distributed.init_ray() == ray.get_runtime_context().gcs_address


def test_shard_needs_a_dataset():
    with pytest.raises(TypeError, match="DataIterator is already a shard"):
        distributed.shard([1, 2, 3])


def test_world_without_process_group():
    assert distributed.world() == (0, 1)


# -- exact resume across a SIGKILL, with 2 ranks and then 2 or 1 ------------------------------
RESUME_SCRIPT = Path(__file__).parent / "scripts" / "ddp_resume.py"


def _launch(out: Path, nproc: int, *args: str, expect_kill: bool = False) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this checkout's package
    if nproc == 1:
        cmd = [sys.executable, str(RESUME_SCRIPT), *args]
    else:
        logs = out / f"logs-{args[0]}-{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "--log-dir", str(logs), "--redirects", "3",
               str(RESUME_SCRIPT), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    logs_text = "".join(
        f"\n--- {f}:\n{f.read_text()[-4000:]}" for f in sorted(out.rglob("stderr.log"))
    )
    if expect_kill and nproc == 1:
        assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
    elif expect_kill:  # torchrun reports the ranks' SIGKILL as a failed run
        assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, f"{proc.stderr[-3000:]}{logs_text}"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("form", ["single", "parts"])
def test_two_ranks_killed_then_resumed_on_two_or_one_rank_is_exact(tmp_path, form):
    """2 ranks, shuffle on, preserve_order off; merged state saved every 4 steps (the
    union inline, or one part file per rank); every rank is SIGKILLed at step 11.
    Resumed on 2 ranks and (separately) on 1: the rows of the checkpoint's merged set and
    the rows yielded after it are the dataset, none twice, with equal steps per rank;
    the next epoch runs in full."""
    from torch_raydata.resume import ConsumedSet

    extra = ["--parts"] if form == "parts" else []
    _launch(tmp_path, 2, "train", str(tmp_path), "--kill-at", "11", *extra, expect_kill=True)
    ckpt = pickle.loads((tmp_path / "ckpt.pkl").read_bytes())
    state = ckpt["loader"]
    assert ckpt["step"] == 8 and state["world_size"] == 2 and state["epoch"] == 0
    fmt = {"single": "roaring64", "parts": "roaring64-parts"}[form]
    assert state["consumed"]["format"] == fmt
    in_ckpt = ConsumedSet.decode(state["consumed"]).sorted_keys().astype(np.int64)
    trained = [
        json.loads(line)
        for r in range(2)
        for line in (tmp_path / f"train_rank{r}.jsonl").read_text().splitlines()
    ]
    assert in_ckpt.tolist() == sorted(i for t in trained if t["step"] <= 8 for i in t["ids"])
    assert len(in_ckpt) == state["rows_consumed"] == 2 * 8 * 32
    _check_resumes(tmp_path, in_ckpt, (("two", 2), ("one", 1)))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_rank_killed_then_resumed_on_two_ranks_is_exact(tmp_path):
    """1 -> 2: one process saves every 4 steps and is SIGKILLed at step 11; two ranks
    resume from its state, split the rest afresh and run it exactly once."""
    from torch_raydata.resume import ConsumedSet

    _launch(tmp_path, 1, "train", str(tmp_path), "--kill-at", "11", expect_kill=True)
    state = pickle.loads((tmp_path / "ckpt.pkl").read_bytes())["loader"]
    in_ckpt = ConsumedSet.decode(state["consumed"]).sorted_keys().astype(np.int64)
    assert len(in_ckpt) == state["rows_consumed"] == 8 * 32
    _check_resumes(tmp_path, in_ckpt, (("two", 2),))


def _check_resumes(tmp_path: Path, in_ckpt: np.ndarray, runs: tuple) -> None:
    remaining = 2000 - len(in_ckpt)
    for tag, nproc in runs:
        _launch(tmp_path, nproc, "resume", str(tmp_path), "--tag", tag)
        ranks = [json.loads((tmp_path / f"{tag}_rank{r}.json").read_text()) for r in range(nproc)]
        rest = [r["epochs"][0] for r in ranks]
        assert {e["epoch"] for e in rest} == {0}
        assert len({len(e["sizes"]) for e in rest}) == 1  # equal steps per rank
        assert len(rest[0]["sizes"]) == -(-(remaining // nproc) // 32)
        both = np.concatenate([in_ckpt, [i for e in rest for i in e["ids"]]])
        assert len(both) == len(np.unique(both)) == 2000, tag
        full = [r["epochs"][1] for r in ranks]
        assert {e["epoch"] for e in full} == {1}
        assert sorted(i for e in full for i in e["ids"]) == list(range(2000)), tag
