"""Train a small CNN on scikit-learn's digits with Lightning, fed by torch_raydata.

The README's main example. Ray Data reads the images from parquet and augments them
(random shift + noise, in ``map_batches``) on the Ray workers; ``RayDataModule`` turns
the stream into shuffled batches in the training process; Lightning trains. Prints the
validation accuracy (about 0.98) and the train loader's stats.

    python examples/train_lightning.py            # 10 epochs, progress bar
    python examples/train_lightning.py --small    # CI: 6 epochs, no progress bar
    python examples/train_lightning.py --ckpt-dir /tmp/digits   # checkpoint every 5 steps;
        # stop it (Ctrl-C, kill -9) and run the same command again: it resumes from the
        # last checkpoint, mid-epoch, on exactly the rows not yet trained on (id_column)

Runs on a local Ray started here (``ray.init``) unless one is already running (or
``RAY_ADDRESS`` names a cluster). CPU only; about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from digits_data import (  # noqa: E402
    DigitsCNN,
    accuracy,
    adam_one_cycle,
    checkpointing,
    quiet_ray_data,
    read_split,
    write_digits,
)

import torch_raydata as trd  # noqa: E402


class LitDigits(pl.LightningModule):
    def __init__(self, max_lr: float = 1e-2) -> None:
        super().__init__()
        self.model = DigitsCNN()
        self.max_lr = max_lr

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["image"])
        loss = torch.nn.functional.cross_entropy(logits, batch["label"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.model(batch["image"])
        self.log("val_acc", accuracy(logits, batch["label"]), prog_bar=True, batch_size=len(logits))

    def configure_optimizers(self):
        # len() of the training loader is known (num_rows below), so Lightning knows
        # the run's steps: the one-cycle schedule spans them, stepped every batch.
        steps = int(self.trainer.estimated_stepping_batches)
        optimizer, schedule = adam_one_cycle(self.parameters(), steps, self.max_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI run: fewer epochs, no progress bar")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (6 with --small)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray started here")
    p.add_argument(
        "--ckpt-dir", default=None,
        help="checkpoint every 5 steps here and resume from its last.ckpt when there is one",
    )
    p.add_argument(
        "--ray-logs", action="store_true",
        help="keep Ray Data's progress bars and INFO lines (off: they interleave with ours)",
    )
    args = p.parse_args(argv)
    epochs = args.epochs or (6 if args.small else 10)

    pl.seed_everything(0, verbose=False)
    # A tiny model: one intra-op thread is faster than two here, and leaves a core to
    # Ray Data's workers (read + augment run there, in parallel with the training step).
    torch.set_num_threads(1)
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data(args.ray_logs)

    with tempfile.TemporaryDirectory() as root:
        files = write_digits(root)
        dm = trd.RayDataModule(
            train=read_split(files.train_dir, augment=True),
            val=read_split(files.val_dir, augment=False),
            batch_size=args.batch_size,
            num_workers=2,
            shuffle_buffer_size=512,  # train only: val/test keep order and every row
            shuffle_seed=0,
            # Ray cannot count rows after map_batches without running it; we wrote the
            # files, so we know: Lightning gets len() (progress total, epoch size).
            # id_column: the loader state in each checkpoint holds the IDs of the rows
            # trained on this epoch, so a resume continues on exactly the others.
            train_options={"num_rows": files.train_rows, "id_column": "id"},
            val_options={"num_rows": files.val_rows},
        )
        callbacks, resume_from = checkpointing(args.ckpt_dir)
        if args.ckpt_dir:
            print(f"resuming from {resume_from}" if resume_from else f"checkpoints in {args.ckpt_dir}")
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=bool(args.ckpt_dir),
            callbacks=callbacks,
            enable_model_summary=False,
            enable_progress_bar=not args.small,
            # --small: validate once, after the last epoch (each pass re-reads the files)
            check_val_every_n_epoch=epochs if args.small else 1,
            num_sanity_val_steps=0 if args.small else 2,
        )
        model = LitDigits()
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm, ckpt_path=resume_from)
        fit_seconds = time.perf_counter() - t0
        val_acc = float(trainer.callback_metrics["val_acc"])
        train_stats = dm.datasets["train"].stats()
        print(
            f"train rows {files.train_rows}, val rows {files.val_rows}, epochs {epochs}, "
            f"fit {fit_seconds:.1f}s"
        )
        print(f"val accuracy: {val_acc:.4f}")
        print("train loader stats (last epoch):")
        print(train_stats)
    return val_acc


if __name__ == "__main__":
    main()
