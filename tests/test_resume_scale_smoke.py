"""The resume-scale benchmark runs end to end (``--quick``) and reports every case.

Runs ``python -m benchmarks.resume_scale --quick`` in a subprocess (fresh processes per
case, each filter case with its own small Ray, so the session's Ray and thread checks are
untouched). Asserts that every case and filter row was measured and tabled, and that the
sets were exact (the merged 8-rank set holds every ID) — nothing about speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_quick_run_measures_and_tables_every_case(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.resume_scale", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    payload = json.loads((tmp_path / "results_resume.json").read_text())
    cases = {(c["pattern"], c["ranks"], c["impl"]): c for c in payload["cases"]}
    assert set(cases) == {
        (p, r, i) for p in ("random", "contiguous") for r in (1, 8) for i in ("before", "after")
    }
    for key, c in cases.items():
        for metric in ("state_ms", "checkpoint_ms", "state_bytes_rank", "merged_bytes",
                       "peak_rss_mb"):
            assert isinstance(c[metric], (int, float)) and not math.isnan(c[metric]), (key, metric)
        if c["impl"] == "after":
            assert c["fold_ns_per_id"] > 0 and c["max_queued_batches"] >= 0, key
            if c["ranks"] == 8:
                assert c["count_check"] is True and c["form"] in ("single", "parts"), key
    filters = {(f["pattern"], f["impl"]) for f in payload["filters"]}
    assert filters == {(p, i) for p in ("random", "contiguous") for i in ("before", "after")} | {
        ("random", "after, cache 1 MiB")  # a worker cache budget of its own
    }
    for f in payload["filters"]:
        assert f["consecutive_ns_per_row"] > 0 and f["shuffled_ns_per_row"] > 0
        # Half of the 2N range is consumed, whichever blocks are drawn from it.
        assert 0.3 < f["shuffled_hit_fraction"] < 0.7, f
    table = (tmp_path / "table_resume.md").read_text()
    assert table.count("| 1M |") == len(cases) + len(filters)
