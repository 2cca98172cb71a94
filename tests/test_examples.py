"""The examples, run with their CI flag (``--small``); the demo's accuracy is checked.

train_lightning / train_torch / train_ray_train run in this process on the session's Ray
(their ``main(argv)`` returns the validation accuracy); train_ddp runs as a script, as
Lightning's DDP launcher re-runs it per rank, attached to the session's Ray via
RAY_ADDRESS. Threshold: validation accuracy >= 0.95 on digits (the examples reach about
0.97-0.98 with ``--small``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MIN_ACCURACY = 0.95

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


@pytest.fixture
def example(monkeypatch):
    """Import an example as a module (its directory on sys.path, for ``digits_data``)."""
    import torch

    monkeypatch.syspath_prepend(str(EXAMPLES))
    threads = torch.get_num_threads()

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    torch.set_num_threads(threads)  # the examples use one intra-op thread


@pytest.mark.timeout(300)
def test_train_lightning_small_reaches_accuracy(example, capsys):
    pytest.importorskip("lightning")
    acc = example("train_lightning").main(["--small"])
    out = capsys.readouterr().out
    assert acc >= MIN_ACCURACY, out
    assert "val accuracy:" in out and "consumer wait ms" in out  # the loader's stats
    assert re.search(r"epoch 5: 23 batches, 1438 rows", out), out


@pytest.mark.timeout(300)
def test_train_torch_small_reaches_accuracy(example, capsys):
    acc = example("train_torch").main(["--small"])
    out = capsys.readouterr().out
    assert acc >= MIN_ACCURACY, out
    assert "batches/s in the loader" in out and "step waited for data" in out


@pytest.mark.timeout(300)
def test_train_ray_train_small_reaches_accuracy(example, capsys):
    pytest.importorskip("lightning")
    acc = example("train_ray_train").main(["--small"])
    out = capsys.readouterr().out
    assert acc >= MIN_ACCURACY, out
    # Equal steps: both workers ran the same number of batches in the last epoch.
    assert "last epoch (batches, rows) per worker: [(23, 719), (23, 719)]" in out, out


@pytest.mark.timeout(400)
def test_train_ddp_small_reaches_accuracy(ray_session, tmp_path):
    pytest.importorskip("lightning")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env["RAY_ADDRESS"] = ray_session.get_runtime_context().gcs_address
    env.pop("TRD_EXAMPLE_DIGITS_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_ddp.py"), "--small", "--ckpt-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=380,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-6000:]
    acc = float(re.search(r"val accuracy: ([0-9.]+)", out).group(1))
    assert acc >= MIN_ACCURACY, out
    # Both ranks: the same batches per epoch; 1438 rows split evenly, 359 val rows leave 1 out.
    lines = sorted(line for line in out.splitlines() if line.startswith("[rank "))
    assert lines[0].startswith("[rank 0] train: 23 batches/epoch (len), last epoch 23 batches, 719 rows"), out
    assert "val: 3 batches, 179 rows, 1 dropped" in lines[0], out
    assert lines[1].startswith("[rank 1] train: 23 batches/epoch (len), last epoch 23 batches, 719 rows"), out
    assert "val: 3 batches, 179 rows, 0 dropped" in lines[1], out
    # Checkpoints every 5 steps under Lightning DDP: RayDataModule.state_dict() gathered
    # both ranks' sets (a collective in every save). The last one, at step 135 of 138
    # (6 epochs x 23), is 20 batches into epoch 5 on each rank: 2 x 20 x 32 rows.
    import torch

    from torch_raydata.resume import ConsumedSet

    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["RayDataModule"]
    train = state["splits"]["train"]
    assert (train["world_size"], train["epoch"], train["batches_consumed"]) == (2, 5, 20)
    assert len(ConsumedSet.decode(train["consumed"])) == train["rows_consumed"] == 2 * 20 * 32
