"""Summaries of the raw measurements: medians, ratios, goals, markdown, JSON and the plot.

Owns: turning per-epoch results into one row per competitor (medians over repetitions;
wait percentiles over all timed batches of all repetitions pooled), the peer-ratio
matrix, the goal checks of issue 3, and the output files. Does not measure anything.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from torch_raydata.pipeline.constants import usable_cpus

from .competitors import LABELS, TRD_BEST

__all__ = [
    "summarize",
    "markdown_workload",
    "ratio_matrix",
    "goals",
    "step_tax_goals",
    "write_json",
    "plot",
]


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.median(values)) if values else float("nan")


def summarize(epochs: list[Any], ttfb: list[float], owns: float | str) -> dict[str, Any]:
    """One competitor on one workload."""
    rates = [e.rows_per_s for e in epochs]
    waits = np.concatenate([e.waits for e in epochs]) * 1e3 if epochs else np.zeros(0)
    p50, p95, p99 = (
        np.percentile(waits, [50, 95, 99]).tolist() if len(waits) else [float("nan")] * 3
    )
    out: dict[str, Any] = {
        "reps": len(epochs),
        "rows": epochs[0].rows if epochs else 0,
        "rows_per_s": _median(rates),
        "rows_per_s_min": min(rates) if rates else float("nan"),
        "rows_per_s_max": max(rates) if rates else float("nan"),
        "rows_per_s_all": rates,
        "ttfb_ms": _median([t * 1e3 for t in ttfb]),
        "ttfb_ms_all": [t * 1e3 for t in ttfb],
        "wait_p50_ms": p50,
        "wait_p95_ms": p95,
        "wait_p99_ms": p99,
        "wait_max_ms": float(waits.max()) if len(waits) else float("nan"),
        "cpu_s_per_1k_rows": _median([e.cpu_seconds / e.rows * 1e3 for e in epochs if e.rows]),
        "rss_peak_delta_mb": max((e.rss_peak_delta for e in epochs), default=0) / 2**20,
        "rss_peak_mb": max((e.rss_peak for e in epochs), default=0) / 2**20,
        # float: fraction of rows seen through views (0 = owns); str: why not checked
        "owns_memory": None if isinstance(owns, str) else owns == 0,
        "view_fraction": None if isinstance(owns, str) else owns,
        "owns_note": owns if isinstance(owns, str) else None,
    }
    extras = [e.extra for e in epochs if e.extra]
    if extras:
        out["peak_buffered_batches"] = max(x["peak_buffered_batches"] for x in extras)
        out["peak_buffered_bytes"] = max(x["peak_buffered_bytes"] for x in extras)
        out["trd_wait_p95_ms"] = _median([x["trd_wait_p95_ms"] for x in extras])
        stages = extras[-1]["trd_stage_seconds"]
        out["trd_stage_seconds_last"] = stages
    return out


def _fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _ratio(a: dict, b: dict | None) -> str:
    if b is None or not b.get("rows_per_s"):
        return "—"
    return f"{a['rows_per_s'] / b['rows_per_s']:.2f}x"


def markdown_workload(title: str, rows: dict[str, dict]) -> str:
    """One table per workload; ratios are rows/s ratios of the medians."""
    ray_t, ray_n, dl2, mem = (rows.get(k) for k in ("ray_torch", "ray_numpy", "dl2", "memcpy"))
    head = (
        "| competitor | rows/s (median) | min–max | ×ray_torch | ×ray_numpy | ×dl2 | of memcpy "
        "| first batch ms | wait p50 / p95 / p99 / max ms | CPU s/1k rows | peak RSS Δ MB "
        "| peak buffered batches / MB | owns memory |"
    )
    lines = [f"**{title}**", "", head, "|" + "---|" * 14]
    for key, r in rows.items():
        buffered = "n/a"
        if "peak_buffered_batches" in r:
            buffered = f"{r['peak_buffered_batches']} / {r['peak_buffered_bytes'] / 2**20:.1f}"
        if r["owns_memory"] is None:
            owns = r["owns_note"]
        elif r["owns_memory"]:
            owns = "yes"
        else:
            owns = f"NO ({r['view_fraction']:.0%} of rows are views)"
        waits = " / ".join(
            _fmt(r[k], 3) for k in ("wait_p50_ms", "wait_p95_ms", "wait_p99_ms", "wait_max_ms")
        )
        lines.append(
            f"| {LABELS[key]} | {_fmt(r['rows_per_s'])} | {_fmt(r['rows_per_s_min'])}–{_fmt(r['rows_per_s_max'])} "
            f"| {_ratio(r, ray_t)} | {_ratio(r, ray_n)} | {_ratio(r, dl2)} | {_ratio(r, mem)} "
            f"| {_fmt(r['ttfb_ms'], 1)} | {waits} | {_fmt(r['cpu_s_per_1k_rows'], 3)} "
            f"| {_fmt(r['rss_peak_delta_mb'], 1)} | {buffered} | {owns} |"
        )
    return "\n".join(lines)


def ratio_matrix(rows: dict[str, dict]) -> str:
    """rows/s of the row competitor divided by that of the column competitor."""
    keys = list(rows)
    lines = [
        "| rows/s ratio (row ÷ column) | " + " | ".join(keys) + " |",
        "|" + "---|" * (len(keys) + 1),
    ]
    for a in keys:
        cells = [_ratio(rows[a], rows[b]) for b in keys]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict[str, dict[str, dict]]) -> list[dict[str, Any]]:
    """Issue 3's goals, for each torch_raydata setting that ran."""
    out: list[dict[str, Any]] = []
    w1, w4 = results.get("fixed", {}), results.get("consumer", {})
    bounds = {
        "trd": 2 * min(4, usable_cpus()) + 4,  # num_workers=None grows up to min(4, cores)
        "trd_best": 2 * TRD_BEST["num_workers"] + TRD_BEST["prefetch_batches"],
    }

    def add(goal: str, key: str, measured: float | None, target: str, met: bool | None) -> None:
        out.append(
            {"goal": goal, "setting": key, "measured": measured, "target": target, "met": met}
        )

    for key in ("trd", "trd_best"):
        if key in w1:
            t = w1[key]
            for peer, need in (("ray_torch", 2.5), ("ray_numpy", 1.4), ("memcpy", 0.7)):
                if peer in w1:
                    r = t["rows_per_s"] / w1[peer]["rows_per_s"]
                    add(f"W1 rows/s ÷ {peer}", key, r, f">= {need}", r >= need)
            add("W1 batches own their memory", key, None, "yes", t["owns_memory"] is True)
            if "ray_torch" in w1:
                r = t["ttfb_ms"] / w1["ray_torch"]["ttfb_ms"]
                add("W1 time to first batch ÷ ray_torch", key, r, "<= 1.0", r <= 1.0)
                r = t["cpu_s_per_1k_rows"] / w1["ray_torch"]["cpu_s_per_1k_rows"]
                add("W1 trainer CPU/1k rows ÷ ray_torch", key, r, "<= 0.5", r <= 0.5)
        if key in w4:
            p95 = w4[key]["wait_p95_ms"]
            ray = w4.get("ray_torch", {}).get("wait_p95_ms")
            note = f"<= 0.1 ms (ray_torch: {ray:.3f} ms)" if ray is not None else "<= 0.1 ms"
            add("W4 between-step overhead p95 (ms), natural loop", key, p95, note, p95 <= 0.1)
        peaks = [(wk, r[key]["peak_buffered_batches"]) for wk, r in results.items() if key in r]
        if peaks:
            worst = max(p for _, p in peaks)
            add(
                "peak buffered batches (max over workloads)",
                key,
                worst,
                f"<= 2*num_workers + prefetch = {bounds[key]}",
                worst <= bounds[key],
            )
    return out


def step_tax_goals(tax: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Issue 13's goals on the step-tax measurement (benchmarks/step_tax.py)."""
    out: list[dict[str, Any]] = []
    # Beside each target: Ray's figure, and the floor's (the same loop with no loader).
    others = {k: tax[k] for k in ("ray_torch", "floor") if k in tax}

    def note(field: str, fmt: str, unit: str) -> str:
        shown = "; ".join(f"{k}: {format(v[field], fmt)}{unit}" for k, v in others.items())
        return f" ({shown})" if shown else ""

    for key in ("trd", "trd_best", "trd_shm"):
        if key not in tax:
            continue
        t = tax[key]
        measured = t["inflation_p50_pct"]
        out.append(
            {
                "goal": "step inflation p50 (Python-heavy step, fed vs alone), %",
                "setting": key,
                "measured": measured,
                "target": "<= +10%" + note("inflation_p50_pct", "+.0f", "%"),
                "met": measured <= 10.0,
            }
        )
        out.append(
            {
                "goal": "between-step overhead p95 (ms), natural loop, 5 ms step (step-tax run)",
                "setting": key,
                "measured": t["gap_p95_ms"],
                "target": "<= 0.1 ms" + note("gap_p95_ms", ".3f", " ms"),
                "met": t["gap_p95_ms"] <= 0.1,
            }
        )
    return out


def markdown_goals(items: list[dict[str, Any]]) -> str:
    lines = ["| goal | setting | measured | target | met |", "|---|---|---|---|---|"]
    for g in items:
        m = g["measured"]
        measured = "—" if m is None else (f"{m:.3f}" if isinstance(m, float) else str(m))
        lines.append(
            f"| {g['goal']} | {g['setting']} | {measured} | {g['target']} | {'met' if g['met'] else 'NOT met'} |"
        )
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            payload, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)
        )


def plot(path: str, results: dict[str, dict[str, dict]], titles: dict[str, str]) -> None:
    """Per workload: rows/s (left, memcpy as a line) and wait p50/p95/p99 (right, log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(n, 2, figsize=(13, 2.6 * n + 0.6), squeeze=False)
    for row, (wk, rows) in enumerate(results.items()):
        keys = [k for k in rows if k != "memcpy"]
        y = np.arange(len(keys))
        ax = axes[row][0]
        ax.barh(y, [rows[k]["rows_per_s"] for k in keys], color="tab:blue")
        ax.errorbar(
            [rows[k]["rows_per_s"] for k in keys],
            y,
            fmt="none",
            ecolor="k",
            xerr=[
                [rows[k]["rows_per_s"] - rows[k]["rows_per_s_min"] for k in keys],
                [rows[k]["rows_per_s_max"] - rows[k]["rows_per_s"] for k in keys],
            ],
        )
        top = max((rows[k]["rows_per_s_max"] for k in keys), default=0.0)
        xlabel = "rows/s (median, min–max)"
        if "memcpy" in rows:
            limit = rows["memcpy"]["rows_per_s"]
            if limit <= 1.5 * top:
                ax.axvline(limit, color="tab:red", ls="--", label="memcpy limit")
                ax.legend(loc="lower right", fontsize=7)
            else:  # off scale: the bars would be invisible next to it
                xlabel += f"; memcpy limit {limit:,.0f} (off scale)"
        ax.set_yticks(y, keys)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(titles.get(wk, wk), fontsize=8, loc="left")
        ax = axes[row][1]
        width = 0.27
        for j, (p, color) in enumerate(
            (
                ("wait_p50_ms", "tab:green"),
                ("wait_p95_ms", "tab:orange"),
                ("wait_p99_ms", "tab:red"),
            )
        ):
            ax.barh(
                y + (j - 1) * width,
                [max(rows[k][p], 1e-4) for k in keys],
                height=width,
                color=color,
                label=p[5:8],
            )
        ax.set_xscale("log")
        ax.set_yticks(y, keys)
        ax.invert_yaxis()
        ax.set_xlabel("consumer wait per batch, ms (log)")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
