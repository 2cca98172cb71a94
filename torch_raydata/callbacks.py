"""Observability: what the loader is doing, shown where the user looks.

Owns the Lightning view of :class:`~torch_raydata.LoaderStats`:

* ``LoaderStatsCallback`` — a Lightning ``Callback`` logging data wait time, rows/s and
  buffered batches to every logger of the trainer, on Lightning's own rows (step, epoch).

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


def loader_metrics(
    stats: Any,
    previous: Any = None,
    prefix: str = "loader/",
    *,
    window: str = "since_last",
    previous_epoch_end: Any = None,
) -> dict[str, float]:
    """Metrics of a :class:`~torch_raydata.LoaderStats` snapshot, as logged by
    ``LoaderStatsCallback``; each name says its window.

    ``{prefix}{window}/...`` cover the interval since ``previous`` (an earlier snapshot;
    None: the epoch so far). If ``previous`` is of an earlier epoch, ``previous_epoch_end``
    (that epoch's last snapshot) joins the two: the rest of that epoch, then this one
    (between epochs nothing is counted). Keys: ``wait_ms_per_step`` (mean time the step
    waited for a batch), ``wait_fraction`` (of the loader's wall time), ``rows_per_s``,
    ``steps`` (batches in the window).

    ``{prefix}epoch/...`` cover the epoch so far: ``wait_p50_ms``, ``wait_p95_ms`` (per
    batch), ``rows_dropped``. ``{prefix}now/...`` are the state at the snapshot:
    ``buffered_batches``, ``buffered_bytes``.
    """
    wait, rows, wall, steps = _totals(stats)
    if previous is not None and previous.epoch == stats.epoch:
        base = _totals(previous)
    elif previous is not None and previous_epoch_end is not None and (
        previous_epoch_end.epoch == previous.epoch
    ):
        rest = [a - b for a, b in zip(_totals(previous_epoch_end), _totals(previous), strict=True)]
        base = tuple(-r for r in rest)  # the previous epoch's remainder joins this window
    else:
        base = (0.0, 0, 0.0, 0)
    wait, rows, wall, steps = (a - b for a, b in zip((wait, rows, wall, steps), base, strict=True))
    wall = max(wall, 1e-9)
    w = f"{prefix}{window}/"
    return {
        f"{w}wait_ms_per_step": 1e3 * wait / steps if steps else 0.0,
        f"{w}wait_fraction": min(1.0, max(0.0, wait / wall)),
        f"{w}rows_per_s": rows / wall,
        f"{w}steps": float(steps),
        f"{prefix}epoch/wait_p50_ms": stats.wait_p50_ms,
        f"{prefix}epoch/wait_p95_ms": stats.wait_p95_ms,
        f"{prefix}epoch/rows_dropped": float(stats.rows_dropped),
        f"{prefix}now/buffered_batches": float(stats.buffered_batches),
        f"{prefix}now/buffered_bytes": float(stats.buffered_bytes),
    }


def _totals(stats: Any) -> tuple[float, int, float, int]:
    return stats.wait_total_seconds, stats.rows, stats.wall_seconds, stats.batches


def _lightning_step(trainer: Any) -> int:
    """The step Lightning writes this training batch's own metrics at (its loggers' x
    axis): the fit loop's count of batches that stepped, before this one is counted. No
    public name for it; ``global_step`` (optimizer steps) is one more at this point."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if step is not None else max(0, trainer.global_step - 1)


def _build_loader_stats_callback() -> type:
    try:
        import lightning.pytorch as pl
    except ImportError as e:
        raise ImportError(
            "torch_raydata.callbacks.LoaderStatsCallback needs Lightning, which is not "
            "installed: pip install 'torch_raydata[lightning]'"
        ) from e

    class LoaderStatsCallback(pl.Callback):
        """Log the training loader's stats to every logger of the trainer, on the rows
        Lightning writes its own training metrics to.

        Rows line up with Lightning's: logged at the step Lightning logs the same batch's
        ``self.log(...)`` metrics at, every ``every_n_steps`` global steps counted as
        Lightning counts them (``log_every_n_steps``: steps ``n-1, 2n-1, ...``, across
        epochs), with an ``epoch`` column. Metrics (see :func:`loader_metrics`; each name
        says its window): ``{prefix}last_{n}_steps/...`` (``wait_ms_per_step``,
        ``wait_fraction``, ``rows_per_s``, ``steps``: the window since the previous row,
        ``n`` steps except the first after a start or resume), ``{prefix}epoch/...``
        (``wait_p50_ms``, ``wait_p95_ms``, ``rows_dropped``: the epoch so far),
        ``{prefix}now/...`` (``buffered_batches``, ``buffered_bytes``). Only rank 0 logs,
        as Lightning's loggers do.

        The loader is found by itself: the ``train`` split of a
        :class:`~torch_raydata.RayDataModule`, or the ``RayIterableDataset`` inside
        ``trainer.train_dataloader``; pass ``dataset=`` to choose one.

        Args:
            every_n_steps: log every this many steps (>= 1); None: the trainer's
                ``log_every_n_steps``, so the rows are Lightning's own.
            prefix: metric name prefix.
            dataset: the ``RayIterableDataset`` to watch (None: find it, see above).

        Example:
            >>> trainer = pl.Trainer(logger=CSVLogger("logs"), log_every_n_steps=50,
            ...                      callbacks=[trd.callbacks.LoaderStatsCallback()])
            >>> trainer.fit(model, datamodule=trd.RayDataModule(train=ds, batch_size=256))
        """

        def __init__(
            self, every_n_steps: int | None = None, prefix: str = "loader/", dataset: Any = None
        ) -> None:
            super().__init__()
            every_n_steps = check_int("every_n_steps", every_n_steps, 1, allow_none=True)
            if not isinstance(prefix, str):
                raise ValueError(f"{prefix=} must be a string")
            self.every_n_steps = every_n_steps
            self.prefix = prefix
            self.dataset = dataset
            self._previous: Any = None  # the snapshot of the last row
            self._epoch_end: Any = None  # the last snapshot of the previous epoch

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

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._previous = self._epoch_end = None

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            ds = self._find_dataset(trainer)
            if ds is not None and self._previous is not None:
                self._epoch_end = ds.stats()  # the epoch's last numbers, for the next window

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            n = self.every_n_steps or trainer.log_every_n_steps
            step = _lightning_step(trainer)
            if not n or (step + 1) % n:  # Lightning's own rule (its logger connector)
                return
            ds = self._find_dataset(trainer)
            if ds is None or not trainer.is_global_zero:
                return
            stats = ds.stats()
            metrics = loader_metrics(
                stats,
                self._previous,
                self.prefix,
                window=f"last_{n}_steps",
                previous_epoch_end=self._epoch_end,
            )
            metrics["epoch"] = float(trainer.current_epoch)
            self._previous, self._epoch_end = stats, None
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

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
