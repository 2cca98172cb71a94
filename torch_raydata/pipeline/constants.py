"""Timeouts and defaults shared by the pipeline stages (one place to tune them)."""

from __future__ import annotations

import os

__all__ = [
    "QUEUE_TIMEOUT",
    "JOIN_TIMEOUT",
    "IDLE_WAIT",
    "FINALIZE_IN_FLIGHT",
    "TRAINING_BLOCK_BYTES",
    "TEARDOWN_WAIT",
    "TEARDOWN_POLL",
    "IDLE_STEP_WAIT",
    "usable_cpus",
    "MATERIALIZED_CACHE_BYTES",
]

# How long a blocked queue get/put or semaphore acquire waits before re-checking the
# stop Event. Short enough that close() returns promptly, long enough not to spin.
QUEUE_TIMEOUT = 0.1

# How long close() waits for each thread. A thread still alive after this is stuck in
# user code (a collate_fn or transport that never returns); we log it by name rather
# than hang the training loop forever.
JOIN_TIMEOUT = 10.0

# Prefetch: when no pending block is ready, block in ray.wait for at most this long
# (returns as soon as any block is ready).
IDLE_WAIT = 0.05

# Finalize: transfers posted to the transport and not yet waited on.
FINALIZE_IN_FLIGHT = 2

# Stage 1: the largest block Ray's executor makes for an epoch we start (its
# target_max_block_size, set on our epoch copy only; a smaller target of the user's wins).
# Ray's default, 128 MiB, is sized for storage: the first batch of an epoch waits for a
# whole block to be produced (e.g. 200 decoded 224 px float images). The first epoch uses
# TRAINING_BLOCK_BYTES; once a row's size is measured, blocks hold about one batch
# (never less than TRAINING_BLOCK_BYTES): the first batch waits for one block, and
# per-block costs (object store, deserialization) are paid once per batch. Measured on
# W7 (600 KB rows, batch 64): 8 MiB blocks, steady ~400 rows/s and later first batches
# 0.8 s; 32 MiB ~480 and 1.0 s; 128 MiB ~570 and 1.2 s.
TRAINING_BLOCK_BYTES = 8 << 20

# Stage 1, early stop: how long to let Ray's running tasks finish before its executor
# is shut down (which cancels them; see source_executor._quiesce for why that is avoided), and
# how often to look.
TEARDOWN_WAIT = 10.0
TEARDOWN_POLL = 0.005

# Stage 1: how long one step of Ray's scheduling loop may pause when the executor has no
# task running (source_executor._Hold.pace). Ray's loop waits for running tasks (0.1 s) but with
# none it spins: measured 20% of the trainer's samples in Ray's scheduling threads while
# a prestarted epoch waited for its turn. Anything that can change the loop's decision on
# our side (a block taken, the hold lifted, an early stop) ends the pause at once; this
# bounds what we cannot see (Ray's budgets refreshing, a late metadata fetch).
IDLE_STEP_WAIT = 0.025

# A MaterializedDataset's deserialized blocks kept across epochs (block_cache.BlockCache), at
# most this many bytes per RayIterableDataset. On the node holding the blocks this costs
# no copy; a block from another node pins its local copy, hence a bound.
MATERIALIZED_CACHE_BYTES = 4 << 30


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or
    ``taskset``'s limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)
