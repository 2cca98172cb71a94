"""Subprocess for the SIGKILL resume test: train (and die) or resume from a checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import signal

import numpy as np
import ray

import torch_raydata as trd


def loader():
    ds = ray.data.range(2000, override_num_blocks=8).map_batches(lambda b: b)
    return trd.RayIterableDataset(
        ds, batch_size=32, id_column="id", shuffle_buffer_size=300, shuffle_seed=1, num_workers=3
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "resume"])
    p.add_argument("out")
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--ckpt-every", type=int, default=4)
    a = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ckpt_path = os.path.join(a.out, "ckpt.pkl")
    ds = loader()
    if a.mode == "train":
        for step, _batch in enumerate(ds, start=1):
            if step % a.ckpt_every == 0:
                tmp = ckpt_path + ".tmp"
                with open(tmp, "wb") as f:
                    pickle.dump({"step": step, "loader": ds.state_dict()}, f)
                os.replace(tmp, ckpt_path)  # atomic, like a real checkpoint writer
            if step == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return
    with open(ckpt_path, "rb") as f:
        ckpt = pickle.load(f)
    ds.load_state_dict(ckpt["loader"])
    after = np.concatenate([b["id"].numpy() for b in ds])
    np.save(os.path.join(a.out, "after.npy"), after)


if __name__ == "__main__":
    main()
