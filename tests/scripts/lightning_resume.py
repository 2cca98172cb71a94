"""Subprocess for the Lightning SIGKILL resume test (tests/test_lightning.py).

``train``: fit with ModelCheckpoint(every_n_train_steps=4) and SIGKILL this process inside
the training step of global step ``--kill-at``. ``resume``: ``trainer.fit(ckpt_path=...)``
from the step-8 checkpoint to the end. Each training step appends
``{"step", "epoch", "ids"}`` to ``<out>/<mode>.jsonl`` (flushed, so it survives the kill).

    python lightning_resume.py train|resume OUT [--known-length] [--kill-at 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

import torch_raydata as trd  # noqa: E402

ROWS, VAL_ROWS, BATCH = 1200, 200, 32


def features(b):
    ids = b["id"]
    x = np.stack([(ids * (k + 3)) % 11 for k in range(4)], axis=1).astype(np.float32)
    return {"id": ids, "x": x, "y": (ids % 2).astype(np.int64)}


class Model(pl.LightningModule):
    def __init__(self, log_path: str, kill_at: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.log_file = open(log_path, "a")  # noqa: SIM115 - open for the whole run
        self.kill_at = kill_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        record = {"step": self.global_step, "epoch": self.current_epoch,
                  "ids": batch["id"].tolist()}
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        return torch.nn.functional.cross_entropy(self.layer(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "resume"])
    p.add_argument("out")
    p.add_argument("--known-length", action="store_true")
    p.add_argument("--kill-at", type=int, default=10)
    p.add_argument("--rows", type=int, default=ROWS)
    p.add_argument("--resume-from", default="step=8.ckpt")
    a = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    train = ray.data.range(a.rows, override_num_blocks=6).map_batches(features, batch_format="numpy")
    val = ray.data.range(VAL_ROWS).map_batches(features, batch_format="numpy")
    dm = trd.RayDataModule(
        train=train,
        val=val,
        batch_size=BATCH,
        num_workers=2,
        id_column="id",
        # Without num_rows Ray cannot know the length after map_batches: Lightning then
        # fetches one batch ahead of the training step.
        train_options={"shuffle_buffer_size": 300, "shuffle_seed": 3,
                       **({"num_rows": a.rows} if a.known_length else {})},
    )
    ckpt_dir = os.path.join(a.out, "ckpt")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            pl.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1, filename="{step}"
            ),
            pl.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, filename="end-{epoch}"
            ),
        ],
    )
    model = Model(os.path.join(a.out, f"{a.mode}.jsonl"), a.kill_at if a.mode == "train" else -1)
    ckpt = os.path.join(ckpt_dir, a.resume_from) if a.mode == "resume" else None
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)


if __name__ == "__main__":
    main()
