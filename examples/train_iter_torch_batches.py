"""Moving a Ray Data training loop to torch_raydata: one line.

The loop every Ray user has::

    for batch in train_ds.iter_torch_batches(batch_size=64, local_shuffle_buffer_size=512):

becomes::

    for batch in trd.iter_torch_batches(train_ds, batch_size=64, local_shuffle_buffer_size=512):

Same keywords, same batches (``dict[str, torch.Tensor]``), on torch_raydata's pipeline:
batches that own their memory, bounded and counted buffers (``.stats()``), a file listing
made once instead of every epoch. ``--ray`` runs Ray's own ``iter_torch_batches`` instead,
to compare. Trains the digits CNN of the other examples; prints the validation accuracy.

    python examples/train_iter_torch_batches.py            # 10 epochs
    python examples/train_iter_torch_batches.py --small    # CI: 6 epochs
    python examples/train_iter_torch_batches.py --ray      # Ray's iter_torch_batches
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

import torch_raydata as trd  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI run: fewer epochs")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (6 with --small)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray started here")
    p.add_argument("--ray", action="store_true", help="use Ray's own iter_torch_batches")
    p.add_argument("--ray-logs", action="store_true", help="keep Ray Data's progress output")
    args = p.parse_args(argv)
    epochs = args.epochs or (6 if args.small else 10)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny model: leave a core to Ray Data's workers
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data(args.ray_logs)

    with tempfile.TemporaryDirectory() as root:
        files = write_digits(root)
        train_ds = read_split(files.train_dir, augment=True)
        val_ds = read_split(files.val_dir, augment=False)
        options = {"batch_size": args.batch_size, "local_shuffle_buffer_size": 512}
        if args.ray:
            train = train_ds.iter_torch_batches(**options)
        else:
            train = trd.iter_torch_batches(train_ds, **options)  # <- the one changed line
        model = DigitsCNN()
        # A one-cycle learning rate over the run's steps, stepped every batch.
        steps = epochs * steps_per_epoch(files.train_rows, args.batch_size)
        opt, schedule = adam_one_cycle(model.parameters(), steps)
        for epoch in range(epochs):
            t0, batches, rows = time.perf_counter(), 0, 0
            for batch in train:  # each iteration of `train` is one epoch
                loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                batches, rows = batches + 1, rows + len(batch["label"])
            print(
                f"epoch {epoch}: loss {loss.item():.3f}, {batches} batches, {rows} rows, "
                f"{time.perf_counter() - t0:.2f}s"
            )
        val = val_ds.iter_torch_batches(batch_size=256) if args.ray else trd.iter_torch_batches(
            val_ds, batch_size=256
        )
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in val:
                correct += int((model(batch["image"]).argmax(dim=1) == batch["label"]).sum())
                total += len(batch["label"])
        val_acc = correct / total
        print(f"train rows {files.train_rows}, val rows {files.val_rows}")
        print(f"val accuracy: {val_acc:.4f}")
        if not args.ray:
            print("train loader stats (last epoch):")
            print(train.stats())
            train.close()
            val.close()
    return val_acc


if __name__ == "__main__":
    main()
