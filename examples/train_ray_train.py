"""Ray Train: ``TorchTrainer`` with 2 CPU workers running Lightning's ``RayDDPStrategy``.

Ray Train splits each dataset across its workers itself (``streaming_split(equal=True)``);
a worker passes its shard, ``ray.train.get_dataset_shard("train")``, to
``RayIterableDataset`` — nothing else to configure. Equal rows per worker give equal
batches per worker (torch_raydata's batching does not cut short batches mid-stream),
so the DDP steps line up.

    python examples/train_ray_train.py            # 10 epochs
    python examples/train_ray_train.py --small    # CI: 6 epochs, validation after the last

Resources: 2 training workers of 0.5 CPU each on a 2-CPU local Ray, which leaves a CPU for
Ray Data's read and augment tasks (Ray Train keeps the workers' CPUs out of Ray Data's
budget). Prints the validation accuracy and each worker's loader stats.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import ray.train  # noqa: E402
from digits_data import (  # noqa: E402
    DigitsCNN,
    accuracy,
    adam_one_cycle,
    quiet_ray_data,
    read_split,
    steps_per_epoch,
    write_digits,
)
from ray.train.torch import TorchTrainer  # noqa: E402


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker (torch.distributed is already set up, gloo)."""
    import lightning.pytorch as pl
    import torch
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
    from torch.utils.data import DataLoader

    import torch_raydata as trd

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)

    class LitDigits(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = DigitsCNN()

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.model(batch["image"]), batch["label"])

        def validation_step(self, batch, batch_idx):
            acc = accuracy(self.model(batch["image"]), batch["label"])
            self.log("val_acc", acc, sync_dist=True, batch_size=len(batch["label"]))

        def configure_optimizers(self):
            # The shards' len() is unknown to Lightning here (Ray Train's iterators do not
            # count rows), so the run's steps come from the row count: this worker's
            # share of the training rows, in batches, times the epochs.
            world = ray.train.get_context().get_world_size()
            steps = config["epochs"] * steps_per_epoch(config["train_rows"], config["batch_size"], world)
            optimizer, schedule = adam_one_cycle(self.parameters(), steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # This worker's shards (DataIterators): used as given, never split again.
    train = trd.RayIterableDataset(
        ray.train.get_dataset_shard("train"),
        batch_size=config["batch_size"],
        num_workers=2,
        shuffle_buffer_size=256,
        shuffle_seed=0,
    )
    val = trd.RayIterableDataset(ray.train.get_dataset_shard("val"), batch_size=128)
    epochs = config["epochs"]
    trainer = pl.Trainer(
        max_epochs=epochs,
        devices="auto",
        accelerator="cpu",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        check_val_every_n_epoch=config["val_every"],
        num_sanity_val_steps=0,
    )
    trainer = prepare_trainer(trainer)
    trainer.fit(
        LitDigits(),
        train_dataloaders=DataLoader(train, batch_size=None),
        val_dataloaders=DataLoader(val, batch_size=None),
    )
    st = train.stats()
    # Every worker's (batches, rows) of the last epoch, to show the steps lined up.
    per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, (st.batches, st.rows))
    metrics = {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "batches_rows_per_rank": per_rank,
        "stats": str(st),
    }
    # Ray Train keeps the metrics reported with rank 0's checkpoint.
    with tempfile.TemporaryDirectory() as ckpt_dir:
        checkpoint = None
        if trainer.global_rank == 0:
            torch.save(trainer.lightning_module.model.state_dict(), os.path.join(ckpt_dir, "model.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(ckpt_dir)
        ray.train.report(metrics, checkpoint=checkpoint)
    train.close()
    val.close()


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI run: fewer epochs, validate once")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (6 with --small)")
    p.add_argument("--batch-size", type=int, default=32, help="per worker (2 workers: 64 rows per step)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray started here")
    p.add_argument(
        "--ray-logs", action="store_true",
        help="keep Ray Data's progress bars and INFO lines (off: they interleave with ours)",
    )
    args = p.parse_args(argv)
    epochs = args.epochs or (6 if args.small else 10)

    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data(args.ray_logs)

    with tempfile.TemporaryDirectory() as root:
        files = write_digits(os.path.join(root, "data"))
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "epochs": epochs,
                "batch_size": args.batch_size,
                "train_rows": files.train_rows,
                "val_every": epochs if args.small else 1,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}
            ),
            datasets={
                "train": read_split(files.train_dir, augment=True),
                "val": read_split(files.val_dir, augment=False),
            },
            run_config=ray.train.RunConfig(name="trd-digits", storage_path=os.path.join(root, "runs")),
        )
        result = trainer.fit()
        metrics = result.metrics
    print(f"train rows {files.train_rows}, val rows {files.val_rows}, epochs {epochs}, 2 workers")
    print(f"last epoch (batches, rows) per worker: {metrics['batches_rows_per_rank']}")
    print(f"val accuracy: {metrics['val_acc']:.4f}")
    print("rank 0 train loader stats (last epoch):")
    print(metrics["stats"])
    return float(metrics["val_acc"])


if __name__ == "__main__":
    main()
