"""Lightning DDP on 2 CPU processes (gloo), each rank training on its own shard.

The digits CNN of ``train_lightning.py`` with ``Trainer(strategy="ddp", devices=2)``.
Lightning re-runs this script once per extra rank; every rank builds the same
``RayDataModule``. What torch_raydata does for DDP:

* ``trd.distributed.init_ray()`` in the launching process starts one local Ray and
  exports ``RAY_ADDRESS``; the ranks Lightning starts inherit it and join that cluster.
  The launching process (rank 0) keeps Ray up at its exit until the other ranks have
  disconnected, so a rank that ends later never loses the cluster.
* At the first epoch each split is divided once with ``streaming_split(2, equal=True)``;
  rank 0 hands rank 1 its shard through a named Ray actor.
* Every rank yields the same number of batches each epoch (rows the equal split leaves
  out are counted in rank 0's ``stats().rows_dropped``), so no rank waits forever in an
  all-reduce.

    python examples/train_ddp.py            # 10 epochs
    python examples/train_ddp.py --small    # CI: 6 epochs, validation after the last

Prints each rank's loader stats and the validation accuracy (averaged over the ranks).
About a minute or two on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from digits_data import (  # noqa: E402
    DigitsCNN,
    accuracy,
    adam_one_cycle,
    checkpointing,
    count_rows,
    quiet_ray_data,
    read_split,
    write_digits,
)

import torch_raydata as trd  # noqa: E402

# The launching process writes the files once; the ranks Lightning starts find them here.
DIR_ENV = "TRD_EXAMPLE_DIGITS_DIR"


class LitDigits(pl.LightningModule):
    def __init__(self, max_lr: float = 1e-2) -> None:
        super().__init__()
        self.model = DigitsCNN()
        self.max_lr = max_lr

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.model(batch["image"]), batch["label"])
        self.log("train_loss", loss, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch, batch_idx):
        acc = accuracy(self.model(batch["image"]), batch["label"])
        self.log("val_acc", acc, sync_dist=True, batch_size=len(batch["label"]))

    def configure_optimizers(self):
        # len() of the training loader is known (num_rows below), so Lightning knows
        # the run's steps: the one-cycle schedule spans them, stepped every batch.
        steps = int(self.trainer.estimated_stepping_batches)
        optimizer, schedule = adam_one_cycle(self.parameters(), steps, self.max_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI run: fewer epochs, validate once")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (6 with --small)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank (2 ranks: 64 rows per step)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray started here")
    p.add_argument(
        "--ckpt-dir", default=None,
        help="checkpoint every 5 steps here (the ranks' loader states merged into each) and "
        "resume from its last.ckpt when there is one",
    )
    p.add_argument(
        "--ray-logs", action="store_true",
        help="keep Ray Data's progress bars and INFO lines (off: they interleave with ours)",
    )
    args = p.parse_args(argv)
    epochs = args.epochs or (6 if args.small else 10)

    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # 2 ranks on 2 cores, plus Ray Data's workers
    # Launching process: start Ray, export RAY_ADDRESS. Ranks started by Lightning: join it.
    trd.distributed.init_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data(args.ray_logs)

    root = os.environ.get(DIR_ENV)
    owner = root is None
    if owner:
        root = tempfile.mkdtemp(prefix="trd-digits-")
        write_digits(root)
        os.environ[DIR_ENV] = root  # inherited by the ranks Lightning starts
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    n_train, n_val = count_rows(train_dir), count_rows(val_dir)  # the files' footers

    dm = trd.RayDataModule(
        # Factories: built in setup(), on every rank (only rank 0's is split).
        train=lambda: read_split(train_dir, augment=True),
        val=lambda: read_split(val_dir, augment=False),
        batch_size=args.batch_size,
        val_options={"num_rows": n_val, "batch_size": 64},
        num_workers=2,
        shuffle_buffer_size=256,
        shuffle_seed=0,
        # len() per rank = ceil(floor(n / 2) / batch); id_column: exact resume (each rank
        # records its rows, every checkpoint holds the union, any world size resumes it).
        train_options={"num_rows": n_train, "id_column": "id"},
    )
    callbacks, resume_from = checkpointing(args.ckpt_dir)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=bool(args.ckpt_dir),
        callbacks=callbacks,
        enable_model_summary=False,
        enable_progress_bar=not args.small,
        check_val_every_n_epoch=epochs if args.small else 1,
        num_sanity_val_steps=0 if args.small else 2,
    )
    trainer.fit(LitDigits(), datamodule=dm, ckpt_path=resume_from)

    rank = trainer.global_rank
    train_stats, val_stats = dm.datasets["train"].stats(), dm.datasets["val"].stats()
    print(
        f"[rank {rank}] train: {len(dm.train_dataloader())} batches/epoch (len), last epoch "
        f"{train_stats.batches} batches, {train_stats.rows} rows, {train_stats.rows_dropped} "
        f"dropped; val: {val_stats.batches} batches, {val_stats.rows} rows, "
        f"{val_stats.rows_dropped} dropped",
        flush=True,
    )
    for note in train_stats.notes:
        print(f"[rank {rank}]   note: {note}", flush=True)
    if rank == 0:
        print(f"train rows {n_train}, val rows {n_val}, epochs {epochs}, 2 ranks")
        print(f"val accuracy: {float(trainer.callback_metrics['val_acc']):.4f}", flush=True)
    # Rank 0 deletes the files: let the others finish with them first. Ray needs no
    # barrier: init_ray() started it in this process, which keeps it up at exit until
    # the other ranks have left it (trd.distributed.EXIT_WAIT_SECONDS).
    trainer.strategy.barrier()
    if owner:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
