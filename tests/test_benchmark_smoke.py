"""The benchmark harness runs end to end (``--smoke``) and reports every competitor.

Runs ``python -m benchmarks.bench --smoke`` in a subprocess (its own small Ray, so the
session's Ray and thread-leak checks are untouched). Asserts that the harness ran and
wrote its table, JSON and plot with every workload x competitor, workload 7 (image
ingest, each competitor in its own process) included — nothing about speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Hang guards, not speed limits: the smoke run starts three local Ray clusters (workload 7's
# two Ray competitors in their own processes, then workloads 1-6), which took 1.5-4 min on
# the shared 2-core machine.
SMOKE_DEADLINE_S = 840

pytestmark = [
    pytest.mark.skipif(
        not (ROOT / "benchmarks" / "bench.py").exists(), reason="benchmarks/ not present"
    ),
    pytest.mark.timeout(SMOKE_DEADLINE_S + 60),
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SMOKE_DEADLINE_S,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return out, proc.stdout


def test_smoke_reports_every_competitor_and_workload(smoke_run):
    from benchmarks.competitors import COMPETITORS, LABELS
    from benchmarks.workloads import WORKLOADS  # 1-6; workload 7 is checked below

    out, stdout = smoke_run
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["smoke"] is True
    assert set(payload["results"]) == set(WORKLOADS)
    for wk, rows in payload["results"].items():
        assert set(rows) == set(COMPETITORS), wk
        for key, r in rows.items():
            assert r["reps"] == 1 and r["rows"] == payload["config"]["rows"], (wk, key)
            for metric in ("rows_per_s", "ttfb_ms", "wait_p95_ms", "cpu_s_per_1k_rows"):
                assert r[metric] == r[metric], (wk, key, metric)  # measured (not NaN)
            assert "owns_memory" in r
        for key in ("trd", "trd_best"):
            assert rows[key]["peak_buffered_batches"] >= 1, wk
            if rows[key]["owns_note"] is None:  # checked (materialized workloads)
                assert rows[key]["owns_memory"] is True, wk  # the design's promise, not a speed
    table = (out / "table.md").read_text()
    for key in COMPETITORS:
        assert LABELS[key] in table and LABELS[key] in stdout
    assert "| goal |" in table
    assert (out / "bench.png").stat().st_size > 0
    assert {g["setting"] for g in payload["goals"]} == {"trd", "trd_best"}
    # The step tax: every competitor with background work, and the floor (no loader).
    from benchmarks.bench import STEP_TAX_KEYS

    taxed = {k for k in (*COMPETITORS, "floor") if k in STEP_TAX_KEYS}
    assert set(payload["step_tax"]) == taxed
    assert LABELS["floor"] in table
    tax_goals = [
        g
        for g in payload["goals"]
        if g["goal"].startswith("step inflation") or "(step-tax run)" in g["goal"]
    ]
    assert len(tax_goals) == 4  # (a) and (b) for trd and trd_best (no shm in --smoke)
    assert all("floor: " in g["target"] for g in tax_goals)


def test_smoke_reports_w7_for_every_competitor(smoke_run):
    from benchmarks import ingest

    out, stdout = smoke_run
    payload = json.loads((out / "results.json").read_text())
    w7 = payload["w7"]
    cfg = w7["config"]
    assert cfg["epochs"] >= 2  # later-epoch figures exist
    assert set(w7["results"]) == set(ingest.COMPETITORS)
    for key, summary in w7["results"].items():
        assert len(summary["runs"]) == summary["rounds"] == cfg["rounds"], key
        for run in summary["runs"]:  # every process, every epoch, every row
            assert len(run["epochs"]) == cfg["epochs"], key
            for e in run["epochs"]:
                assert e["rows"] == cfg["images"], (key, e)
                assert e["batches"] == -(-cfg["images"] // cfg["batch_size"]), (key, e)
                assert 0 <= e["first_batch_s"] <= e["wall_s"], (key, e)
            assert run["total_wall_s"] >= sum(e["wall_s"] for e in run["epochs"]) * 0.999, key
            if key == "dataloader":
                assert run["object_store_peak_bytes"] is None
            else:  # sampled from Ray while the epochs ran
                assert run["object_store_error"] is None, (key, run["object_store_error"])
                assert run["object_store_samples"] >= 1 and run["object_store_peak_bytes"] >= 0
        if key == "trd":  # the library's own stats() were recorded after every epoch
            assert all("trd_stats" in e for e in summary["runs"][0]["epochs"])
    names = {
        f"{m}_trd_over_{p}"
        for m in ("total_wall", "later_first_batch")
        for p in ("ray_itb", "dataloader")
    }
    assert set(w7["ratios"]) == names and len(w7["ratios_per_round"]) == cfg["rounds"]
    table = (out / "table.md").read_text()
    for label in ingest.LABELS.values():
        assert label in table and label in stdout
    assert {g["goal"] for g in ingest.goals(w7)} <= {g["goal"] for g in payload["goals"]}
