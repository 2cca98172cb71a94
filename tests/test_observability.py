"""Observability: the progress bar of the plain-PyTorch path, the Lightning stats callback,
and the straggler log line of distributed runs."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch

import torch_raydata as trd
from torch_raydata import callbacks
from torch_raydata.distributed import cluster

ray_session = pytest.mark.usefixtures("ray_session")


def _ds(n=1000, mapped=False):
    import ray

    ds = ray.data.range(n, override_num_blocks=4)
    return ds.map_batches(lambda b: b) if mapped else ds


class _Recorder(callbacks.EpochProgressBar):
    made: list[_Recorder] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Recorder.made.append(self)


@pytest.fixture
def bars(monkeypatch):
    _Recorder.made = []
    monkeypatch.setattr(trd.dataset, "EpochProgressBar", _Recorder)
    return _Recorder.made


# -- progress bar ----------------------------------------------------------------------------
@ray_session
def test_progress_bar_counts_the_epoch_with_its_total_and_closes_with_it(bars):
    out = io.StringIO()
    before = set(threading.enumerate())
    ds = trd.RayIterableDataset(_ds(), batch_size=100, progress={"file": out, "mininterval": 0})
    for epoch in range(2):
        assert sum(len(b["id"]) for b in ds) == 1000
        bar = bars[epoch]
        assert bar.closed and bar.total == len(ds) == 10 and bar.n == 10
    text = out.getvalue()
    assert "epoch 0" in text and "epoch 1" in text and "10/10" in text and "rows/s" in text
    ds.close()  # the prestarted epoch 2 belongs to the dataset until then
    assert set(threading.enumerate()) <= before  # no tqdm monitor thread, nothing left


@ray_session
def test_progress_bar_without_a_known_length_and_after_a_break(bars):
    ds = trd.RayIterableDataset(_ds(mapped=True), batch_size=100, progress={"file": io.StringIO()})
    for i, _ in enumerate(ds):
        if i == 2:
            break  # the run is dropped with the loop: the bar closes with it
    assert bars[0].total is None and bars[0].n == 3 and bars[0].closed
    it = iter(ds)
    next(it)
    ds.close()
    assert bars[1].closed and bars[1].n == 1


@ray_session
def test_progress_bar_closes_when_the_epoch_fails(bars):
    def broken(table):
        raise RuntimeError("bad batch")

    ds = trd.RayIterableDataset(_ds(), collate_fn=broken, progress={"file": io.StringIO()})
    with pytest.raises(RuntimeError, match="bad batch"):
        list(ds)
    assert bars[0].closed and bars[0].n == 0


@ray_session
def test_no_progress_bar_by_default(bars):
    list(trd.RayIterableDataset(_ds(100)))
    assert bars == []


def test_the_bar_is_a_stats_listener_and_needs_no_ray():
    from torch_raydata.pipeline.stats import StatsRecorder

    out = io.StringIO()
    stats = StatsRecorder(3)
    bar = callbacks.EpochProgressBar(3, total=2, file=out, mininterval=0)
    stats.add_listener(bar)
    stats.start(0.0)
    stats.delivered(10, 0.001, 0.1)
    stats.delivered(10, 0.002, 0.2)
    stats.finish(0.3)
    stats.finish(0.4)  # once
    assert bar.closed and bar.n == 2 and "epoch 3" in out.getvalue()


# -- LoaderStatsCallback ---------------------------------------------------------------------
def test_loader_metrics_cover_the_interval_between_two_snapshots():
    from torch_raydata.pipeline.stats import StatsRecorder

    rec = StatsRecorder(0)
    rec.start(0.0)
    rec.delivered(100, 0.5, 1.0)
    first = rec.snapshot(1.0)
    rec.delivered(300, 0.25, 2.0)
    m = callbacks.loader_metrics(rec.snapshot(2.0), first, prefix="d/", window="w")
    assert m["d/w/wait_ms_per_step"] == pytest.approx(250) and m["d/w/steps"] == 1
    assert m["d/w/rows_per_s"] == pytest.approx(300) and m["d/w/wait_fraction"] == 0.25
    whole = callbacks.loader_metrics(rec.snapshot(2.0))
    assert whole["loader/since_last/wait_ms_per_step"] == pytest.approx(375)
    assert whole["loader/since_last/rows_per_s"] == 200
    assert whole["loader/epoch/wait_p95_ms"] > whole["loader/epoch/wait_p50_ms"] > 0
    # A window across an epoch's end: the rest of epoch 0, then epoch 1 so far.
    nxt = StatsRecorder(1)
    nxt.start(5.0)
    nxt.delivered(50, 0.1, 6.0)
    m = callbacks.loader_metrics(
        nxt.snapshot(6.0), first, window="w", previous_epoch_end=rec.snapshot(2.0)
    )
    assert m["loader/w/steps"] == 2 and m["loader/w/rows_per_s"] == pytest.approx(350 / 2)


def _fit(tmp_path, every, datamodule=True):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["id"].float()[:, None]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-6)

    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=logger,
        callbacks=[trd.callbacks.LoaderStatsCallback(every_n_steps=every)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if datamodule:
        trainer.fit(Tiny(), datamodule=trd.RayDataModule(train=_ds(1200), batch_size=100))
    else:
        loader = torch.utils.data.DataLoader(
            trd.RayIterableDataset(_ds(1200), batch_size=100), batch_size=None
        )
        trainer.fit(Tiny(), train_dataloaders=loader)
        # Lightning keeps the loader in reference cycles: close the dataset (and its
        # prestarted next epoch) now, not at a garbage collection after ray.shutdown().
        loader.dataset.close()
    import csv

    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@ray_session
@pytest.mark.parametrize("datamodule", [True, False], ids=["RayDataModule", "DataLoader"])
def test_loader_stats_callback_logs_to_a_csv_logger_every_n_steps(tmp_path, datamodule):
    rows = _fit(tmp_path, every=4, datamodule=datamodule)
    logged = [r for r in rows if r.get("loader/last_4_steps/rows_per_s")]
    # 12 steps per epoch, 2 epochs: every 4th step counted across epochs, at the step
    # Lightning itself logs that batch at (its rows: 3, 7, ...; global_step is one more).
    assert [(int(r["step"]), int(float(r["epoch"]))) for r in logged] == [
        (3, 0), (7, 0), (11, 0), (15, 1), (19, 1), (23, 1)
    ]
    for r in logged:
        assert float(r["loader/last_4_steps/rows_per_s"]) > 0
        assert float(r["loader/last_4_steps/steps"]) == 4
        assert 0 <= float(r["loader/last_4_steps/wait_fraction"]) <= 1
        assert float(r["loader/last_4_steps/wait_ms_per_step"]) >= 0
        assert float(r["loader/epoch/wait_p95_ms"]) >= 0
        assert float(r["loader/now/buffered_batches"]) >= 0
        assert float(r["loader/now/buffered_bytes"]) >= 0


def test_callback_is_reexported_and_validates():
    pytest.importorskip("lightning.pytorch")
    from torch_raydata.lightning import LoaderStatsCallback

    assert LoaderStatsCallback is trd.callbacks.LoaderStatsCallback
    with pytest.raises(ValueError, match="every_n_steps=0 must be an int >= 1"):
        LoaderStatsCallback(every_n_steps=0)


def test_import_torch_raydata_needs_no_lightning_and_reads_the_straggler_threshold():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import torch_raydata as trd\n"
        "assert trd.callbacks.EpochProgressBar\n"
        "print('threshold', trd.distributed.STRAGGLER_SECONDS)\n"
        "try:\n"
        "    trd.callbacks.LoaderStatsCallback\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    env = {**os.environ, "TORCH_RAYDATA_STRAGGLER_SECONDS": "2.5"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "needs Lightning" in out.stdout and "pip install" in out.stdout
    assert "threshold 2.5" in out.stdout


# -- straggler log line ----------------------------------------------------------------------
def test_a_rank_waiting_at_a_collective_logs_one_line_naming_it(caplog, monkeypatch):
    monkeypatch.setattr(cluster, "STRAGGLER_SECONDS", 0.01)
    late = threading.Event()  # the other ranks: never arrive here, so the wait times out

    def collective(x, *, src):
        late.wait(0.05)  # a collective that returns when the slowest rank arrives
        return x, src

    with caplog.at_level(logging.WARNING, logger="torch_raydata.distributed"):
        assert cluster.collective("shard() (test)", collective, 1, src=0) == (1, 0)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("torch_raydata: rank 0 waited ")
    assert record.getMessage().endswith(" s for the other ranks at shard() (test)")

    caplog.clear()
    monkeypatch.setattr(cluster, "STRAGGLER_SECONDS", 60.0)
    with caplog.at_level(logging.WARNING, logger="torch_raydata.distributed"):
        cluster.collective("shard() (test)", lambda: None)
    assert caplog.records == []  # a prompt collective logs nothing

