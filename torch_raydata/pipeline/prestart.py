"""Epoch pipelining: stage 1 of the next epoch starts before the current epoch ends.

Owns: at most one prestarted block stream per dataset, when to start it, its byte hold,
and tearing it down. Does not own: starting a stream (``source.RaySource.open``) or the
epoch that runs it (``run.EpochRun``).

Why: Ray starts a new streaming executor for every epoch of a ``Dataset``, and the time
from its start to its first block is spent before the first batch can exist (about
1-5 s for a ``read_parquet`` on Ray 2.60, mostly listing files, against tens of ms for
in-memory data). Started while the current epoch still runs, that time overlaps the
training steps instead of stalling them.

When: the current epoch's stream reports each block it hands to the prefetch thread
(``observe(rows, done)``, on that thread). The next epoch starts as soon as the current
one's stream has ended or its executor has finished (every block produced, some still to
be consumed), or earlier when both hold:
  * the producer has about as much work left as a new executor takes to its first block:
    once an epoch of this stream has run to its end (or the row count is known), the rows
    still to come at the rate measured in this epoch give the time left; the start
    latency is measured on streams started at ``iter()`` (open to first block) and
    raised by every prestart that came too late (its claim found no block); never
    before half the epoch's rows;
  * the running executor leaves a CPU idle (fewer of its tasks run than the cluster has
    CPUs): its tail, or a pipeline held back by a slow step.
Why the second condition: on a machine whose CPUs the running epoch keeps busy (image
decode on 2 cores, benchmark W7), a next epoch started on the time rule alone took CPU
from the running one: 3 epochs 15.1 s against 13.2 s without prestart in one run (steady
rows/s 306-341 against 363-451). Starting at the very beginning of an epoch was worse
still (14.5 s against 12.7 s, higher object-store peak). A prestart only at the stream's
end costs the running epoch nothing but comes too late to hide the start: on W7 it began
0.07 s before ``iter()`` and the first batch came 0.27-0.39 s after it. With the gate at
"fewer tasks than CPUs", three A/B rounds on a quiet machine (W7, 2 CPUs) gave the same
3-epoch wall (+1%, +2%, 0%) and first batches of later epochs 0.01-0.02 s after
``iter()``; the object-store peak rose from 110-147 to 225-234 MiB (two epochs' windows
overlap; each W7 block is ~38 MB). An earlier gate of "CPUs less one" (for the training
process Ray does not count) was measured while Ray 2.60 split the CPU limits between two
executors (``source_executor._size_to_cluster`` fixes that); it is no longer needed.

Memory: the prestarted executor starts no new task once ``hold_bytes`` of its output
wait for us (the prefetch window's bytes, counted in ``stats()`` as the next epoch's);
the hold is lifted when the epoch is claimed. A prestarted stream has consumed nothing,
so the loader state is unaffected; any change to what the next epoch would run (a
loaded state, a different stream) discards it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .constants import TRAINING_BLOCK_BYTES

__all__ = ["Prestartable", "NextEpoch"]

logger = logging.getLogger(__name__)



class Prestartable(Protocol):
    """What :class:`NextEpoch` needs of a block stream (``source.EpochBlocks``)."""

    def producer_done(self) -> bool: ...

    def has_idle_cpus(self) -> bool: ...

    def release(self) -> None: ...

    def queued_bytes(self) -> int: ...

    def close(self) -> None: ...


class NextEpoch:
    """The dataset's prestarted next epoch (one at a time; thread-safe).

    Args:
        open_stream: ``(hold_bytes, row_bytes) -> stream``: starts a stream without
            waiting for it (``row_bytes``: the last measured row size, or None).
        enabled: False turns epoch pipelining off (every epoch starts at ``iter()``).
    """

    def __init__(
        self,
        open_stream: Callable[[int, float | None], Prestartable],
        *,
        enabled: bool,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._open = open_stream
        self._clock = clock  # the streams' ``opened_at`` clock (tests pass a fake one)
        self.enabled = enabled
        self._cond = threading.Condition()
        self._slot: Any = None  # None, _OPENING, _DISCARD (discarded while opening), a stream
        self._started_at: float | None = None
        self._closed = False
        self._starter: threading.Thread | None = None  # start_soon's thread
        self.row_bytes: float | None = None  # bytes per row of the last watched stream
        self.epoch_rows: int | None = None  # rows of the last stream watched to its end
        # Seconds from a stream's open to its first block, measured (see module doc).
        self.start_latency: float | None = None
        # The next watched stream is a claimed prestart: "late" (its claim found no block
        # produced yet) or "on time"; None: started at iter().
        self._prestarted: str | None = None
        self.started = 0  # streams prestarted so far
        self.used = 0  # of those, claimed by an epoch
        self.discarded = 0  # torn down unused (close, a loaded state, ...)

    # -- the running epoch's side (prefetch thread) ------------------------------------------
    def watch(
        self, stream: Prestartable, *, window_rows: int, expected_rows: int | None = None
    ) -> Callable[..., None]:
        """An observer for the running epoch's ``stream`` (``observer(rows, done,
        size_bytes)``, called on the prefetch thread after each block and at its end) that
        starts the next epoch when the module doc's "When" says so (when enabled; it
        measures the row size and start latency either way). ``window_rows``: the prefetch
        window, in rows, the next epoch's hold admits (at the row size measured here);
        ``expected_rows``: the epoch's rows if known before one has run to its end."""
        nbytes = [0]
        enabled = self.enabled
        # Rows this epoch will deliver: counted when one ran to its end, else as known.
        expected = self.epoch_rows if self.epoch_rows is not None else expected_rows
        first: list[Any] = []  # (time, rows) at the first block
        opened = getattr(stream, "opened_at", None)
        prestarted, self._prestarted = self._prestarted, None
        late = prestarted == "late"

        def observe(rows: int, done: bool, size_bytes: int = 0) -> None:
            nbytes[0] += size_bytes
            if rows and nbytes[0]:
                self.row_bytes = nbytes[0] / rows
            now = self._clock()
            if not first and rows:
                first.append((now, rows))
                if not prestarted or late:  # an on-time prestart tells nothing
                    self._measure_latency(opened, now, late=late)
            if done:
                self.epoch_rows = rows
            if enabled and self._slot is None and (
                done
                or stream.producer_done()
                or (self._due(rows, expected, first, now) and stream.has_idle_cpus())
            ):
                self.start(self.hold_for(window_rows))

        return observe

    def _measure_latency(self, opened: float | None, now: float, *, late: bool) -> None:
        """Open -> first block: of a stream started at ``iter()`` as measured; of a
        prestarted one whose claim had to wait for its first block, at least that."""
        if opened is None:
            return
        if not late:
            self.start_latency = now - opened
        else:
            self.start_latency = max(self.start_latency or 0.0, now - opened)

    def _due(self, rows: int, expected: int | None, first: list[Any], now: float) -> bool:
        """The rows still to come will take about the start latency at this epoch's rate
        (and half the epoch has come)."""
        latency = self.start_latency
        if expected is None or latency is None or not first or rows * 2 < expected:
            return False
        t0, rows0 = first[0]
        if now <= t0 or rows <= rows0:
            return False
        rate = (rows - rows0) / (now - t0)
        return (expected - rows) / rate <= latency

    def hold_for(self, window_rows: int) -> int:
        """The byte hold for a prestarted stream: ``window_rows`` rows at the last measured
        row size (one training-sized block before any row was measured)."""
        if self.row_bytes is None:
            return TRAINING_BLOCK_BYTES
        return max(1, int(window_rows * self.row_bytes))

    def start_soon(self, hold_bytes: int) -> None:
        """:meth:`start` on a short-lived thread (``trd-next-epoch``), joined by
        :meth:`close`; a no-op while one runs or a stream is held."""
        with self._cond:
            if self._closed or self._slot is not None or not self.enabled:
                return
            if self._starter is not None and self._starter.is_alive():
                return
            self._starter = threading.Thread(
                target=self.start, args=(hold_bytes,), name="trd-next-epoch", daemon=True
            )
            self._starter.start()

    def start(self, hold_bytes: int) -> None:
        """Start the next epoch's stream now, unless one is held or this is closed."""
        with self._cond:
            if self._closed or self._slot is not None or not self.enabled:
                return
            self._slot = _OPENING  # reserved: a second trigger is a no-op
        stream: Prestartable | None = None
        try:
            stream = self._open(hold_bytes, self.row_bytes)
        except Exception:  # noqa: BLE001 - a failed prestart is an ordinary start later
            logger.warning("torch_raydata: starting the next epoch early failed", exc_info=True)
        with self._cond:
            keep = stream is not None and self._slot is _OPENING and not self._closed
            self._slot = stream if keep else None
            if keep:
                self._started_at = self._clock()
                self.started += 1
            self._cond.notify_all()
        if stream is not None and not keep:  # closed or discarded while opening
            stream.close()

    # -- the next epoch's side (consumer thread, at iter()) ---------------------------------
    def claim(self) -> tuple[Prestartable, float] | None:
        """The prestarted stream (hold lifted) and how long ago it started; None if none.
        A stream still being opened is waited for (opening does not wait for Ray's output)."""
        with self._cond:
            while self._slot is _OPENING:
                self._cond.wait()
            stream, self._slot = self._slot, None
            started = self._started_at
        if stream is None or stream is _DISCARD:
            return None
        now = self._clock()
        assert started is not None
        # Its first block not produced yet: the prestart came too late (see watch()).
        self._prestarted = "late" if stream.queued_bytes() == 0 else "on time"
        stream.release()
        self.used += 1
        return stream, now - started

    def queued_bytes(self) -> int:
        """Bytes of the next epoch produced and waiting (0 when none is prestarted)."""
        slot = self._slot
        return slot.queued_bytes() if slot is not None else 0

    @property
    def pending(self) -> bool:
        """A prestarted stream is held."""
        return self._slot is not None and not isinstance(self._slot, _Marker)

    def discard(self) -> None:
        """Tear the prestarted stream down (the next epoch will start at ``iter()``)."""
        with self._cond:
            slot = self._slot
            if slot is _OPENING:
                self._slot = _DISCARD
                return
            self._slot = None if slot is not _DISCARD else slot
        if slot is not None and not isinstance(slot, _Marker):
            self.discarded += 1
            slot.close()

    def close(self) -> None:
        """Discard, and start nothing from now on (the dataset is closed or collected)."""
        with self._cond:
            self._closed = True
            starter = self._starter
        if starter is not None and starter is not threading.current_thread():
            starter.join()  # opening does not wait for Ray: it ends soon
        self.discard()


class _Marker:
    """Slot states while a stream is being opened (no stream object yet)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def release(self) -> None:
        pass

    def queued_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


_OPENING: Any = _Marker("<opening>")
_DISCARD: Any = _Marker("<discarded while opening>")
