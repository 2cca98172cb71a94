"""Timeouts and defaults shared by the pipeline stages (one place to tune them)."""

from __future__ import annotations

__all__ = ["QUEUE_TIMEOUT", "JOIN_TIMEOUT", "IDLE_WAIT", "FINALIZE_IN_FLIGHT"]

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
