"""How stages hand items to each other: the consumer's pull (``next_item``, ``Inbox``),
the bound on items in flight (``Slots``) and emptying a queue on close (``drain``).

Owns these queue idioms. Does not own the threads on either end (the stages)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from .constants import QUEUE_TIMEOUT
from .errors import ExceptionWrapper

__all__ = ["drain", "next_item", "Inbox", "Slots"]


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


def drain(out: queue.SimpleQueue[Any], on_item: Callable[[Any], None] | None = None) -> int:
    """Take every item left in ``out`` without waiting (a closed stage's output nobody will
    consume, so its memory goes now), passing each to ``on_item``; return how many."""
    n = 0
    while True:
        try:
            item = out.get_nowait()
        except queue.Empty:
            return n
        n += 1
        if on_item is not None:
            on_item(item)


class Inbox:
    """The consumer's end of a producer thread's queue (prefetch, finalize, NIXL output).

    ``next()`` returns the next item; at the producer's ``end`` sentinel it raises
    StopIteration, and an exception the producer forwarded (an ExceptionWrapper) is
    re-raised with its type, message and stage. After either it is ``done``: every later
    call raises StopIteration without touching the queue.
    """

    __slots__ = ("out", "stop", "end", "done")

    def __init__(self, out: queue.SimpleQueue[Any], stop: threading.Event, end: object) -> None:
        self.out = out
        self.stop = stop
        self.end = end
        self.done = False

    def next(self) -> Any:
        if self.done:
            raise StopIteration
        try:
            item = next_item(self.out, self.stop, self.end)
        except StopIteration:
            self.done = True
            raise
        if isinstance(item, ExceptionWrapper):
            self.done = True
            item.reraise()
        return item


class Slots:
    """A counting semaphore whose ``acquire`` and ``release`` run in C: a SimpleQueue of
    tokens.

    Why not ``threading.Semaphore``: it is a Python ``Condition`` (several Python frames
    and a lock allocated per wait). On the consumer's path, releasing one slot per batch
    was 11% of the GIL-held samples of an epoch of 3x64x64 uint8 rows (py-spy --gil),
    time during which no collate thread can run. ``SimpleQueue.get`` takes a token
    without touching a lock when one is there, and ``put`` wakes one waiter.
    """

    __slots__ = ("_tokens",)

    def __init__(self, value: int) -> None:
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(value):
            self._tokens.put(None)

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a slot; False if none came within ``timeout`` seconds (0: do not wait)."""
        try:
            self._tokens.get(timeout=timeout)
        except queue.Empty:
            return False
        return True

    def release(self) -> None:
        """Give one slot back (wakes one waiting ``acquire``)."""
        self._tokens.put(None)
