"""A plain PyTorch training loop over ``RayIterableDataset(...).loader()``.

The digits CNN of ``train_lightning.py`` without Lightning: Ray Data reads and augments,
``RayIterableDataset`` batches (shuffled, collated on 2 threads), the loop trains. After
each epoch it prints batches/s and how long the training step waited for data, from
``ds.stats()``; at the end the validation accuracy.

    python examples/train_torch.py            # 10 epochs
    python examples/train_torch.py --small    # CI: 6 epochs

Runs on a local Ray started here unless one is running (or ``RAY_ADDRESS`` is set).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402
from digits_data import (  # noqa: E402
    DigitsCNN,
    adam_one_cycle,
    quiet_ray_data,
    read_split,
    steps_per_epoch,
    write_digits,
)
from torch.utils.data import DataLoader  # noqa: E402

import torch_raydata as trd  # noqa: E402


def evaluate(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            pred = model(batch["image"]).argmax(dim=1)
            correct += int((pred == batch["label"]).sum())
            total += len(pred)
    model.train()
    return correct / total


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI run: fewer epochs")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (6 with --small)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray started here")
    p.add_argument(
        "--ray-logs", action="store_true",
        help="keep Ray Data's progress bars and INFO lines (off: they interleave with ours)",
    )
    args = p.parse_args(argv)
    epochs = args.epochs or (6 if args.small else 10)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny model: leave a core to Ray Data's workers
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data(args.ray_logs)

    with tempfile.TemporaryDirectory() as root:
        files = write_digits(root)
        train = trd.RayIterableDataset(
            read_split(files.train_dir, augment=True),
            batch_size=args.batch_size,
            num_workers=2,
            shuffle_buffer_size=512,
            shuffle_seed=0,
        )
        val = trd.RayIterableDataset(
            read_split(files.val_dir, augment=False), batch_size=256, preserve_order=True
        )
        model = DigitsCNN()
        # A one-cycle learning rate over the run's steps, stepped every batch.
        steps = epochs * steps_per_epoch(files.train_rows, args.batch_size)
        opt, schedule = adam_one_cycle(model.parameters(), steps)
        loader = train.loader()  # DataLoader(train, batch_size=None): batches come whole
        for epoch in range(epochs):
            t0 = time.perf_counter()
            for batch in loader:
                loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
            epoch_s = time.perf_counter() - t0
            st = train.stats()
            # stats() times the epoch's pipeline from its first block on; the epoch's wall
            # time also includes Ray Data starting the dataset's execution (iter()).
            print(
                f"epoch {epoch}: loss {loss.item():.3f}, {st.batches} batches, "
                f"{st.batches / st.wall_seconds:.1f} batches/s in the loader "
                f"({st.batches / epoch_s:.1f}/s over the epoch's {epoch_s:.2f}s); step waited "
                f"for data {st.wait_total_seconds:.3f}s (p50 {st.wait_p50_ms:.2f} ms, "
                f"max {st.wait_max_ms:.1f} ms)"
            )
        val_acc = evaluate(model, val.loader())
        print(f"val accuracy: {val_acc:.4f}")
        print("train loader stats (last epoch):")
        print(train.stats())
        train.close()
        val.close()
    return val_acc


if __name__ == "__main__":
    main()
