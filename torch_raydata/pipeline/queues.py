"""The one way a stage's consumer takes the next item from its producer thread's queue."""

from __future__ import annotations

import queue
import threading
from typing import Any

from .constants import QUEUE_TIMEOUT

__all__ = ["next_item"]


def next_item(out: queue.SimpleQueue[Any], stop: threading.Event, end: object) -> Any:
    """Block until the producer hands on an item and return it.

    Raises StopIteration at the producer's ``end`` sentinel, or once ``stop`` is set and
    nothing arrives within QUEUE_TIMEOUT (so a closed stage never blocks its consumer).
    """
    while True:
        try:
            item = out.get(timeout=QUEUE_TIMEOUT)
        except queue.Empty:
            if stop.is_set():
                raise StopIteration from None
            continue
        if item is end:
            raise StopIteration
        return item
