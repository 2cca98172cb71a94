"""A tqdm bar over one epoch's batches for the plain-PyTorch path
(``RayIterableDataset(..., progress=True)``): a stats listener with the total when
``len()`` is known, rows/s and the consumer's wait in the postfix, closed when the epoch
ends (exhausted, broken out of, failed or garbage-collected). No thread: tqdm's monitor
thread is disabled.

Owns the bar. Does not own the numbers (``stats.py``) nor the Lightning view
(``torch_raydata.callbacks.LoaderStatsCallback``). Importing this module does not import
tqdm: the bar imports it when one is made.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["EpochProgressBar"]


class EpochProgressBar:
    """A stats listener (``StatsRecorder.add_listener``): one tqdm bar for one epoch.

    Args:
        epoch: shown in the description.
        total: batches expected this epoch (None: unknown, the bar counts up).
        tqdm_kwargs: more ``tqdm`` arguments (``file``, ``desc``, ``leave``, ``position``,
            ``disable``...), e.g. from ``RayIterableDataset(progress={"desc": "train"})``.
    """

    def __init__(self, epoch: int, total: int | None = None, **tqdm_kwargs: Any) -> None:
        options = {"desc": f"epoch {epoch}", "unit": "batch", "dynamic_ncols": True}
        options.update(tqdm_kwargs)
        self._bar = _bar_class()(total=total, **options)
        self._rows = 0
        self._t0 = time.perf_counter()
        self._last_postfix = 0.0
        self.closed = False

    def on_batch(self, rows: int, wait_s: float = 0.0) -> None:
        self._rows += rows
        self._bar.update(1)
        now = time.perf_counter()
        if now - self._last_postfix >= 0.5:  # formatting the postfix costs; twice a second
            self._last_postfix = now
            elapsed = now - self._t0
            rate = self._rows / elapsed if elapsed > 0 else 0.0
            self._bar.set_postfix_str(f"{rate:,.0f} rows/s, wait {wait_s * 1e3:.1f} ms", refresh=False)

    def on_finish(self) -> None:
        if not self.closed:
            self.closed = True
            self._bar.close()

    @property
    def n(self) -> int:
        """Batches counted so far."""
        return self._bar.n

    @property
    def total(self) -> int | None:
        return self._bar.total


_BAR_CLASS: Any = None


def _bar_class() -> Any:
    global _BAR_CLASS
    if _BAR_CLASS is None:
        from tqdm.auto import tqdm

        class _Bar(tqdm):  # type: ignore[misc, valid-type]
            # No monitor thread (tqdm starts one per process by default): a bar lives for
            # one epoch and is closed with it, so nothing outlives the epoch.
            monitor_interval = 0

        _BAR_CLASS = _Bar
    return _BAR_CLASS
