"""Benchmark harness for torch_raydata (not part of the installed package).

Run ``python -m benchmarks.bench`` (see benchmarks/README.md). Modules:
``workloads`` (data), ``competitors`` (loaders), ``collates`` (fair collate functions),
``measure`` (the timed loop), ``report`` (tables, goals, JSON, plot), ``results_md``
(RESULTS.md), ``bench`` (the command line and the interleaved schedule); for NOTES.md:
``profile_w1`` (a long run for py-spy) and ``experiments`` (A/B runs).
"""
