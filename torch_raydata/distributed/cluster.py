"""The run's Ray cluster and the collectives over torch.distributed ranks.

Owns, for torch.distributed runs (torchrun, Lightning ``strategy="ddp"``) where every rank
runs the same script:

* :func:`init_ray` — attach every rank to the same Ray cluster (``RAY_ADDRESS`` when set;
  otherwise rank 0 starts a local one and shares its address over torch.distributed).
* :func:`world` — ``(rank, world_size)``; :func:`broadcast` and :func:`collective`, which
  log a rank that waited longer than :data:`STRAGGLER_SECONDS` for the others.
* :func:`gather_state_dict` — every rank's loader state merged into one.
* The exit of a process that started the run's Ray: it waits (bounded, see
  :data:`EXIT_WAIT_SECONDS`) until the other drivers -- the other ranks -- have left the
  cluster, since Ray shuts a cluster down with the process that started it.

Does not own splitting a dataset across the ranks (``sharding.py``) nor merging states
(``torch_raydata.resume.merge``). Public Ray APIs only, except the GCS job table, which
``pipeline/source.py`` reads for us (``other_live_drivers``).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..resume.merge import GATHER_MAX_BYTES, inline_bytes, merge_states, part_state

__all__ = [
    "EXIT_WAIT_SECONDS",
    "STRAGGLER_SECONDS",
    "broadcast",
    "check_same_cluster",
    "collective",
    "gather_state_dict",
    "gcs_address",
    "init_ray",
    "wait_for_other_drivers",
    "world",
]

logger = logging.getLogger(__name__)

# ray.init arguments that are valid when connecting to an existing cluster; the rest
# (num_cpus, include_dashboard, ...) only apply when starting one.
_CONNECT_KEYS = ("namespace", "runtime_env", "log_to_driver", "logging_level", "logging_format")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default torch.distributed group; ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


#: A rank that waits longer than this many seconds for the others at one of the
#: collectives here logs one line naming itself and the place (a straggler shows as the
#: rank that did NOT log). Env ``TORCH_RAYDATA_STRAGGLER_SECONDS`` overrides the default.
STRAGGLER_SECONDS = float(os.environ.get("TORCH_RAYDATA_STRAGGLER_SECONDS", "5"))


def collective(where: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a collective; logs when this rank waited > STRAGGLER_SECONDS."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    waited = time.perf_counter() - t0
    if waited > STRAGGLER_SECONDS:
        logger.warning(
            "torch_raydata: rank %d waited %.1f s for the other ranks at %s",
            world()[0], waited, where,
        )
    return out


def broadcast(obj: Any, where: str = "a broadcast from rank 0") -> Any:
    """``obj`` from rank 0, on every rank (collective: every rank must call it)."""
    box = [obj]
    collective(where, torch.distributed.broadcast_object_list, box, src=0)
    return box[0]


def gather_state_dict(
    state: dict[str, Any],
    *,
    spill_dir: str | None = None,
    max_gather_bytes: int = GATHER_MAX_BYTES,
) -> dict[str, Any]:
    """Every rank's ``RayIterableDataset.state_dict()`` merged into one (collective).

    Call it on every rank at the same training step; every rank gets the same merged
    state, which resumes at any world size (the rest of the epoch is split afresh among
    the ranks). Single-process: returns ``state`` as is.

    Two forms (``torch_raydata.resume.merge``): when the ranks' consumed-ID sets are at
    most ``max_gather_bytes`` together, they are gathered and united into the state
    (single form). Larger, each rank writes its own set to a file in ``spill_dir`` (a
    directory every rank can write and the resumed run can read, e.g. the checkpoint
    directory) and the state lists the files (parts form): no rank receives the others'
    sets, and the union is built when a run loads the state.

        state = trd.distributed.gather_state_dict(ds.state_dict(), spill_dir=ckpt_dir)
        if dist.get_rank() == 0:
            torch.save({"model": ..., "loader": state}, path)

    Raises:
        ValueError: the sets are larger than ``max_gather_bytes`` and no ``spill_dir``
            is given (on every rank alike), or the ranks' states disagree.
    """
    rank, size = world()
    if size == 1:
        return state
    where = "gather_state_dict() (every rank saves loader state)"
    sizes: list[Any] = [None] * size
    collective(where, torch.distributed.all_gather_object, sizes, inline_bytes(state))
    total = sum(sizes)
    if total > max_gather_bytes:
        if spill_dir is None:
            raise ValueError(
                f"the ranks' consumed-ID sets are {total:,} bytes together (> "
                f"{max_gather_bytes=}): set RayIterableDataset.spill_dir (or pass spill_dir=) "
                "to a directory every rank can write and the resumed run can read (e.g. the "
                "checkpoint directory); each rank then saves its own part there"
            )
        state = part_state(state, spill_dir, rank, size)
    states: list[Any] = [None] * size
    collective(where, torch.distributed.all_gather_object, states, state)
    return merge_states(states, spill_dir=spill_dir)


#: Seconds a process that started the run's Ray waits, at its exit, for the other drivers
#: connected to that cluster (the other ranks) to disconnect. Ray shuts a local cluster
#: down with the process that started it: a rank still connected then loses its objects
#: ("Attempting to recover N lost objects") and Ray ends it with exit code 1 and no
#: traceback, even after its work is done. 0 turns the wait off. Env
#: ``TORCH_RAYDATA_EXIT_WAIT_SECONDS`` overrides the default; ``init_ray(exit_wait=...)``
#: overrides both.
EXIT_WAIT_SECONDS = float(os.environ.get("TORCH_RAYDATA_EXIT_WAIT_SECONDS", "120"))

# Ray publishes no "driver disconnected" event a driver can subscribe to without its
# dashboard: the exit wait polls the GCS job table at this interval.
_EXIT_POLL = 0.1

# The exit wait of this process (None: it started no Ray, or the hook is not registered).
_exit_wait: float | None = None


def wait_for_other_drivers(
    timeout: float,
    *,
    list_drivers: Callable[[], list[tuple[str, int]]] | None = None,
    poll: float = _EXIT_POLL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Wait up to ``timeout`` seconds until no driver other than this process is
    connected to its Ray cluster.

    Logs (INFO) what it waits for when it has to wait, a warning naming the drivers after
    :data:`STRAGGLER_SECONDS`, and a warning when ``timeout`` is hit. Never raises: a
    failing job-table read ends the wait with a warning.

    Args:
        timeout: the bound, in seconds.
        list_drivers: ``() -> [(job id, pid)]`` of the other live drivers (default: Ray's
            job table, ``pipeline.source.other_live_drivers``).

    Returns:
        True when no other driver is left; False when the bound was hit or the table
        could not be read.
    """
    if list_drivers is None:
        from ..pipeline.source import other_live_drivers as list_drivers
    start = clock()
    warned = False
    first = True
    while True:
        try:
            drivers = list_drivers()
        except Exception:  # noqa: BLE001 - at exit: say so and let the process end
            logger.warning(
                "torch_raydata: could not read Ray's job table to wait for the other ranks "
                "before this process shuts its Ray down", exc_info=True,
            )
            return False
        if not drivers:
            return True
        waited = clock() - start
        pids = ", ".join(str(pid) for _, pid in drivers)
        if first:
            first = False
            logger.info(
                "torch_raydata: this process started the Ray cluster that %d other driver(s) "
                "(pids %s) still use; waiting up to %.0f s for them to disconnect before Ray "
                "shuts the cluster down with this process (TORCH_RAYDATA_EXIT_WAIT_SECONDS)",
                len(drivers), pids, timeout,
            )
        if waited >= timeout:
            logger.warning(
                "torch_raydata: %d driver(s) (pids %s) still use the Ray cluster this process "
                "started, after waiting %.0f s (TORCH_RAYDATA_EXIT_WAIT_SECONDS); it shuts "
                "down now and they lose it",
                len(drivers), pids, waited,
            )
            return False
        if not warned and waited >= STRAGGLER_SECONDS:
            warned = True
            logger.warning(
                "torch_raydata: at exit, waiting for %d driver(s) (pids %s; the other ranks) "
                "to leave the Ray cluster this process started (up to %.0f s, "
                "TORCH_RAYDATA_EXIT_WAIT_SECONDS)",
                len(drivers), pids, timeout,
            )
        sleep(poll)


def _wait_at_exit() -> None:
    """atexit hook of a process that started the run's Ray (registered after Ray's own
    ``ray.shutdown`` hook, so it runs first)."""
    import ray

    timeout = _exit_wait
    if not timeout or not ray.is_initialized():  # off, or the user shut Ray down already
        return
    if getattr(sys, "last_value", None) is not None:
        # An uncaught exception ends this process (Python sets sys.last_value when it
        # prints one): the other ranks may be blocked in a collective with it, and the
        # launcher tears them down once it has exited; waiting would delay that.
        logger.warning(
            "torch_raydata: this process ends with an error; it does not wait for the other "
            "ranks to leave the Ray cluster it started"
        )
        return
    wait_for_other_drivers(timeout)


def _start_ray(exit_wait: float | None, **ray_init_kwargs: Any) -> None:
    """Start a local Ray in this process and wait for the other drivers at exit."""
    import ray

    global _exit_wait
    ray.init(**ray_init_kwargs)
    first = _exit_wait is None
    _exit_wait = EXIT_WAIT_SECONDS if exit_wait is None else exit_wait
    if first:
        atexit.register(_wait_at_exit)


def gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def _env_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` from a launcher's environment (torchrun, Lightning), if any."""
    size = os.environ.get("WORLD_SIZE")
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK"))
    if size is None or rank is None:
        return None
    try:
        return int(rank), int(size)
    except ValueError:
        return None


def check_same_cluster(expected: str, rank: int) -> None:
    mine = gcs_address()
    if mine != expected:
        raise RuntimeError(
            f"rank {rank} is connected to the Ray cluster at {mine!r} but rank 0 uses "
            f"{expected!r}: every rank must use one cluster. Call "
            "torch_raydata.distributed.init_ray() on every rank before anything starts Ray "
            "(building a ray.data Dataset does), or set RAY_ADDRESS for every rank"
        )


def init_ray(
    *,
    num_cpus: int | None = None,
    export_address: bool = True,
    exit_wait: float | None = None,
    **ray_init_kwargs: Any,
) -> str:
    """Attach this process to the run's Ray cluster; return the cluster's GCS address.

    * Already connected: kept (under torch.distributed, checked to be rank 0's cluster).
    * ``RAY_ADDRESS`` set: ``ray.init(address=RAY_ADDRESS)``.
    * Under torch.distributed with more than one rank: collective, call it on every rank.
      Rank 0 starts a local Ray (``ray.init(num_cpus=num_cpus, **ray_init_kwargs)``) and
      broadcasts its address; the other ranks connect to it.
    * Otherwise: start a local Ray. With ``export_address`` (default) its address is put
      in ``os.environ["RAY_ADDRESS"]``, so processes this one starts later join the same
      cluster — Lightning's DDP launcher re-runs the script once per rank.

    A process that starts Ray here keeps it up at its exit until the other drivers (the
    other ranks) have disconnected, up to ``exit_wait`` seconds: Ray takes a local cluster
    down with the process that started it, and a rank still attached would die with exit
    code 1 (rank 0 often ends first, e.g. after a last ``barrier()``). The other ranks
    disconnect at their own exit (Ray's ``atexit`` hook).

    Args:
        num_cpus: CPUs of a Ray started here (None: all of the machine's).
        export_address: export ``RAY_ADDRESS`` after starting a local Ray (single process).
        exit_wait: seconds a process that starts Ray here waits at exit for the other
            drivers to disconnect (default :data:`EXIT_WAIT_SECONDS`, 120, or env
            ``TORCH_RAYDATA_EXIT_WAIT_SECONDS``; 0: no wait).
        ray_init_kwargs: more ``ray.init`` arguments; when connecting to a running cluster
            only ``namespace``, ``runtime_env`` and the logging ones are passed on.

    Returns:
        The GCS address (``"ip:port"``), the value ``RAY_ADDRESS`` takes.

    Example:
        >>> torch.distributed.init_process_group("gloo")   # torchrun: first
        >>> trd.distributed.init_ray(num_cpus=4)            # then Ray, on every rank
        >>> ds = ray.data.read_parquet(path)                # then datasets
    """
    import ray

    if exit_wait is not None and not exit_wait >= 0:
        raise ValueError(f"{exit_wait=} must be >= 0 seconds (0: do not wait at exit)")
    connect = {k: v for k, v in ray_init_kwargs.items() if k in _CONNECT_KEYS}
    rank, size = world()
    if size > 1:
        address = None
        if rank == 0:
            if not ray.is_initialized():
                if os.environ.get("RAY_ADDRESS"):
                    ray.init(address=os.environ["RAY_ADDRESS"], **connect)
                else:
                    _start_ray(exit_wait, num_cpus=num_cpus, **ray_init_kwargs)
            address = gcs_address()
        address = broadcast(address, "init_ray() (rank 0 shares the Ray address)")
        if rank != 0:
            if ray.is_initialized():
                check_same_cluster(address, rank)
            else:
                ray.init(address=address, **connect)
        return address
    if ray.is_initialized():
        return gcs_address()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **connect)
        return gcs_address()
    env = _env_world()
    if env is not None and env[1] > 1:
        raise RuntimeError(
            f"init_ray() on rank {env[0]} of {env[1]} (WORLD_SIZE is set) before "
            "torch.distributed.init_process_group() and without RAY_ADDRESS: the ranks cannot "
            "agree on one Ray cluster yet. Call init_process_group() first (torchrun), call "
            "init_ray() in the launching process before trainer.fit() (Lightning DDP), or "
            "set RAY_ADDRESS"
        )
    _start_ray(exit_wait, num_cpus=num_cpus, **ray_init_kwargs)
    address = gcs_address()
    if export_address:
        os.environ["RAY_ADDRESS"] = address
    return address
