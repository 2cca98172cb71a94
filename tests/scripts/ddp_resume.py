"""Subprocess for the distributed SIGKILL resume test (tests/test_distributed.py).

``train`` (torchrun, 2 ranks): every 4 steps each rank takes its loader state, the states
are merged with ``trd.distributed.gather_state_dict`` and rank 0 writes the checkpoint;
at step ``--kill-at`` every rank SIGKILLs itself. ``resume`` (torchrun with any number of
ranks, or plain python for one): load the merged state on every rank, run the rest of
the epoch and one more epoch, and write what each rank saw to ``<out>/<tag>_rank<r>.json``.

    torchrun --standalone --nproc_per_node=2 ddp_resume.py train OUT [--parts]
    python ddp_resume.py resume OUT --tag one

``--parts``: states saved as per-rank part files (``gather_state_dict`` with
``max_gather_bytes=0``). ``train`` also runs as one plain process (then 1 -> N).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import signal

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch.distributed as dist  # noqa: E402

import torch_raydata as trd  # noqa: E402

ROWS, BATCH = 2000, 32


def loader():
    import ray

    # Materialized: under DDP the resumed epoch filters on the cluster and splits the
    # remaining rows afresh (a local drop after the usual split would leave ranks unequal).
    ds = ray.data.range(ROWS, override_num_blocks=8).materialize()
    return trd.RayIterableDataset(
        ds, batch_size=BATCH, id_column="id", shuffle_buffer_size=300, shuffle_seed=1,
        num_workers=2,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "resume"])
    p.add_argument("out")
    p.add_argument("--kill-at", type=int, default=11)
    p.add_argument("--tag", default="resume")
    p.add_argument("--parts", action="store_true", help="save per-rank parts (no gather)")
    a = p.parse_args()
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = trd.distributed.world()[0]
    trd.distributed.init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ckpt_path = os.path.join(a.out, "ckpt.pkl")
    ds = loader()
    if a.mode == "train":
        with open(os.path.join(a.out, f"train_rank{rank}.jsonl"), "w") as log:
            for step, batch in enumerate(ds, start=1):
                log.write(json.dumps({"step": step, "ids": batch["id"].tolist()}) + "\n")
                log.flush()
                if step % 4 == 0:
                    if a.parts:  # each rank writes its own set; the state lists the files
                        state = trd.distributed.gather_state_dict(
                            ds.state_dict(), spill_dir=os.path.join(a.out, "parts"),
                            max_gather_bytes=0,
                        )
                    else:
                        state = trd.distributed.gather_state_dict(ds.state_dict())
                    if rank == 0:
                        with open(ckpt_path + ".tmp", "wb") as f:
                            pickle.dump({"step": step, "loader": state}, f)
                        os.replace(ckpt_path + ".tmp", ckpt_path)
                    if dist.is_initialized():
                        dist.barrier()  # the checkpoint is on disk before anyone goes on
                if step == a.kill_at:
                    if dist.is_initialized():
                        dist.barrier()
                    os.kill(os.getpid(), signal.SIGKILL)
        raise SystemExit("the epoch ended before --kill-at")
    with open(ckpt_path, "rb") as f:
        ds.load_state_dict(pickle.load(f)["loader"])
    epochs = []
    for _ in range(2):  # the rest of the saved epoch, then a full one
        sizes, ids = [], []
        for batch in ds:
            sizes.append(len(batch["id"]))
            ids += batch["id"].tolist()
        epochs.append({"sizes": sizes, "ids": ids, "epoch": ds.stats().epoch})
    with open(os.path.join(a.out, f"{a.tag}_rank{rank}.json"), "w") as f:
        json.dump({"epochs": epochs}, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
