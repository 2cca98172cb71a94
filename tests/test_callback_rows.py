"""``LoaderStatsCallback`` rows line up with Lightning's own, with a real Trainer on CPU.

Lightning writes a batch's ``self.log(..., on_step=True)`` metrics at its own step (the
batches that stepped before it) every ``log_every_n_steps``, counted across epochs, with
an ``epoch`` column. The loader's rows must carry the same (step, epoch) pairs.
"""

from __future__ import annotations

import csv

import pytest
import torch

import torch_raydata as trd

pytestmark = pytest.mark.usefixtures("ray_session")


def _rows(tmp_path, *, log_every, callback, epochs=3, rows=1000, batch_size=100):
    pl = pytest.importorskip("lightning.pytorch")
    import ray
    from lightning.pytorch.loggers import CSVLogger

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch["id"].float()[:, None]).mean()
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-6)

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, log_every_n_steps=log_every,
        logger=CSVLogger(tmp_path, name="run", version=0), callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    dm = trd.RayDataModule(train=ray.data.range(rows), batch_size=batch_size)
    trainer.fit(Tiny(), datamodule=dm)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _pairs(rows, key):
    return [(int(r["step"]), int(float(r["epoch"]))) for r in rows if r.get(key)]


def test_rows_are_lightnings_rows(tmp_path):
    # 10 steps per epoch, 3 epochs, Lightning logs every 4 steps: 3, 7 | 11, 15, 19 | 23, 27.
    rows = _rows(tmp_path, log_every=4, callback=trd.callbacks.LoaderStatsCallback())
    lightning = _pairs(rows, "train_loss")
    ours = _pairs(rows, "loader/last_4_steps/rows_per_s")
    assert lightning == [(3, 0), (7, 0), (11, 1), (15, 1), (19, 1), (23, 2), (27, 2)]
    assert ours == lightning
    windows = [float(r["loader/last_4_steps/steps"]) for r in rows if r.get("loader/last_4_steps/steps")]
    assert windows == [4.0] * 7  # each row covers exactly the last 4 steps, across epochs too


def test_own_cadence_keeps_lightnings_step_and_epoch(tmp_path):
    rows = _rows(tmp_path, log_every=50, callback=trd.callbacks.LoaderStatsCallback(every_n_steps=5))
    assert _pairs(rows, "loader/last_5_steps/rows_per_s") == [
        (4, 0), (9, 0), (14, 1), (19, 1), (24, 2), (29, 2)
    ]
