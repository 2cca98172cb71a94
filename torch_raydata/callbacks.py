"""Observability: what the loader is doing, shown where the user looks.

Owns the Lightning view of :class:`~torch_raydata.LoaderStats`:

* ``LoaderStatsCallback`` — a Lightning ``Callback`` logging data wait time, rows/s and
  buffered batches to every logger of the trainer every N training steps.

Re-exports :class:`EpochProgressBar`, the tqdm bar of the plain-PyTorch path
(``pipeline/progress_bar.py``). Does not own the numbers (``pipeline/stats.py``) nor the
straggler log line of distributed runs (``torch_raydata.distributed``).

Importing this module does not import Lightning: ``LoaderStatsCallback`` is built on
first access (importing Lightning then).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._checks import check_int
from .dataset import RayIterableDataset
from .pipeline.progress_bar import EpochProgressBar

__all__ = ["EpochProgressBar", "LoaderStatsCallback", "loader_metrics"]  # noqa: F822 - lazy


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
            every_n_steps = check_int("every_n_steps", every_n_steps, 1)
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
