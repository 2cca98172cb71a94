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


def start_local_ray() -> None:
    """A private local Ray (2 CPUs, no dashboard) whose workers can import this package
    (they unpickle the workloads' functions, which live here) whatever the current
    directory; shared by ``bench`` and ``ingest``. ``address="local"``: with no address,
    ray.init would join a cluster another session started with `ray start`."""
    import logging

    import ray

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH", "")
    if root not in path.split(os.pathsep):  # the workers inherit this environment
        os.environ["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
