"""Observability: what the loader is doing, shown where the user looks.

Owns two views of :class:`~torch_raydata.LoaderStats`:

* :class:`EpochProgressBar` — a tqdm bar over one epoch's batches for the plain-PyTorch
  path (``RayIterableDataset(..., progress=True)``): total when ``len()`` is known, rows/s
  and the consumer's wait in the postfix, closed when the epoch ends (exhausted, broken
  out of, failed or garbage-collected). No thread: tqdm's monitor thread is disabled.
* ``LoaderStatsCallback`` — a Lightning ``Callback`` logging data wait time, rows/s and
  buffered batches to every logger of the trainer every N training steps.

Does not own the numbers (``pipeline/stats.py``) nor the straggler log line of
distributed runs (``distributed.py``).

Importing this module needs neither tqdm nor Lightning: the bar imports tqdm when one is
made, and ``LoaderStatsCallback`` is built on first access (importing Lightning then).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

__all__ = ["EpochProgressBar", "LoaderStatsCallback", "loader_metrics"]  # noqa: F822 - lazy


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


def loader_metrics(stats: Any, previous: Any = None, prefix: str = "loader/") -> dict[str, float]:
    """Metrics of a :class:`~torch_raydata.LoaderStats` snapshot, as logged by
    ``LoaderStatsCallback``. With ``previous`` (an earlier snapshot of the same epoch),
    ``wait_s``, ``wait_fraction`` and ``rows_per_s`` cover the interval between the two;
    else the epoch so far.

    Keys (after ``prefix``): ``wait_s`` (seconds the training step waited for data),
    ``wait_fraction`` (of wall time), ``wait_p50_ms``/``wait_p95_ms`` (per batch, epoch so
    far), ``rows_per_s``, ``buffered_batches``, ``buffered_bytes``, ``rows_dropped``.
    """
    same_epoch = previous is not None and previous.epoch == stats.epoch
    base_wait = previous.wait_total_seconds if same_epoch else 0.0
    base_rows = previous.rows if same_epoch else 0
    base_wall = previous.wall_seconds if same_epoch else 0.0
    wall = max(stats.wall_seconds - base_wall, 1e-9)
    wait = stats.wait_total_seconds - base_wait
    return {
        f"{prefix}wait_s": wait,
        f"{prefix}wait_fraction": min(1.0, wait / wall),
        f"{prefix}wait_p50_ms": stats.wait_p50_ms,
        f"{prefix}wait_p95_ms": stats.wait_p95_ms,
        f"{prefix}rows_per_s": (stats.rows - base_rows) / wall,
        f"{prefix}buffered_batches": float(stats.buffered_batches),
        f"{prefix}buffered_bytes": float(stats.buffered_bytes),
        f"{prefix}rows_dropped": float(stats.rows_dropped),
    }


def _build_loader_stats_callback() -> type:
    try:
        import lightning.pytorch as pl
    except ImportError as e:
        raise ImportError(
            "torch_raydata.callbacks.LoaderStatsCallback needs Lightning, which is not "
            "installed: pip install 'torch_raydata[lightning]'"
        ) from e

    class LoaderStatsCallback(pl.Callback):
        """Log the training loader's stats to every logger of the trainer, every N steps.

        Logs :func:`loader_metrics` (data wait time and its fraction of wall time, rows/s
        over the last N steps, wait percentiles, buffered batches and bytes, rows dropped)
        with ``logger.log_metrics(metrics, step=trainer.global_step)`` for each of
        ``trainer.loggers`` (CSV, TensorBoard, W&B, MLflow...). Only rank 0 logs, as
        Lightning's loggers do.

        The loader is found by itself: the ``train`` split of a
        :class:`~torch_raydata.RayDataModule`, or the ``RayIterableDataset`` inside
        ``trainer.train_dataloader``; pass ``dataset=`` to choose one.

        Args:
            every_n_steps: log after every this many training batches (>= 1).
            prefix: metric name prefix.
            dataset: the ``RayIterableDataset`` to watch (None: find it, see above).

        Example:
            >>> trainer = pl.Trainer(logger=CSVLogger("logs"),
            ...                      callbacks=[trd.callbacks.LoaderStatsCallback(every_n_steps=50)])
            >>> trainer.fit(model, datamodule=trd.RayDataModule(train=ds, batch_size=256))
        """

        def __init__(
            self, every_n_steps: int = 50, prefix: str = "loader/", dataset: Any = None
        ) -> None:
            super().__init__()
            if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
                raise ValueError(f"{every_n_steps=} must be an int >= 1")
            if not isinstance(prefix, str):
                raise ValueError(f"{prefix=} must be a string")
            self.every_n_steps = every_n_steps
            self.prefix = prefix
            self.dataset = dataset
            self._previous: Any = None
            self._batches = 0

        def _find_dataset(self, trainer: Any) -> Any:
            if self.dataset is not None:
                return self.dataset
            from .dataset import RayIterableDataset

            dm = getattr(trainer, "datamodule", None)
            datasets = getattr(dm, "datasets", None)
            if isinstance(datasets, Mapping):
                ds = datasets.get("train")
                if isinstance(ds, RayIterableDataset):
                    return ds
            loader = getattr(trainer, "train_dataloader", None)
            ds = getattr(loader, "dataset", None)
            return ds if isinstance(ds, RayIterableDataset) else None

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._previous, self._batches = None, 0

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self._batches += 1
            if self._batches % self.every_n_steps:
                return
            ds = self._find_dataset(trainer)
            if ds is None or not trainer.is_global_zero:
                return
            stats = ds.stats()
            metrics = loader_metrics(stats, self._previous, self.prefix)
            self._previous = stats
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    LoaderStatsCallback.__module__ = __name__
    LoaderStatsCallback.__qualname__ = "LoaderStatsCallback"
    return LoaderStatsCallback


def __getattr__(name: str) -> Any:
    # Lazy: building the class imports Lightning (an extra, and seconds to import).
    if name == "LoaderStatsCallback":
        cls = _build_loader_stats_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
