"""Benchmark harness for torch_raydata (not part of the installed package).

Run from the repository root, ``python -m benchmarks.bench`` (see benchmarks/README.md).
Modules: ``workloads`` (data of workloads 1-6), ``parquet`` (workload 5 and the layout
probe), ``collates`` (fair collate functions), ``competitors`` (loaders), ``measure``
(the timed loop), ``report`` (tables, goals, JSON, plot), ``results_md`` (RESULTS.md),
``ingest`` (workload 7: image ingest over several epochs, one process per competitor),
``bench`` (the command line and the schedule); ``bench_resume`` and ``bench_nixl`` are
separate harnesses (resume filter cost, the NIXL transport).
"""

import os

# Ray's token authentication is off for the local clusters these harnesses start (set
# before any submodule imports ray).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
