"""The examples, run with their CI flag (``--small``): they finish, learn, and see their data.

train_lightning / train_torch / train_ray_train run in this process on the session's Ray
(their ``main(argv)`` returns the validation accuracy); train_ddp runs as a script, as
Lightning's DDP launcher re-runs it per rank, attached to the session's Ray via
RAY_ADDRESS. Threshold: validation accuracy >= 0.95 on digits. With ``--small`` the
examples reached 0.975-0.989 (14 runs, Adam under a one-cycle rate); with the constant
rate they had before, a DDP run once ended at 0.944 in CI.

What is checked is the meaning of the output, not its layout: the accuracy (returned, or
parsed after "val accuracy:"), and numbers parsed from it (every training row seen in the
last epoch, equal steps on every rank or worker). Wording, spacing, progress bars and
the loader's stats layout may change without breaking these tests.
"""

from __future__ import annotations

import ast
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


def _number(pattern: str, out: str) -> float:
    """The number captured by ``pattern`` in ``out`` (fails naming what was looked for)."""
    m = re.search(pattern, out)
    assert m, f"no match for {pattern!r} in the output:\n{out[-3000:]}"
    return float(m.group(1))


def _train_rows(out: str) -> int:
    return int(_number(r"train rows (\d+)", out))


@pytest.mark.timeout(300)
def test_train_lightning_small_reaches_accuracy(example, capsys):
    pytest.importorskip("lightning")
    acc = example("train_lightning").main(["--small"])
    out = capsys.readouterr().out
    assert acc >= MIN_ACCURACY, out
    assert _number(r"val accuracy:\s*([0-9.]+)", out) == pytest.approx(acc, abs=1e-4)
    # The loader's stats of the last epoch follow: it saw every training row.
    stats = out.split("train loader stats", 1)[-1]
    assert re.search(rf"\b{_train_rows(out)} rows\b", stats), out


@pytest.mark.timeout(300)
def test_train_torch_small_reaches_accuracy(example, capsys):
    acc = example("train_torch").main(["--small"])
    out = capsys.readouterr().out
    assert acc >= MIN_ACCURACY, out
    assert _number(r"val accuracy:\s*([0-9.]+)", out) == pytest.approx(acc, abs=1e-4)
    # One line per epoch, epochs 0..n-1 in order, every epoch the same (non-zero) batches
    # (the per-epoch lines come before the loader's stats, which start with "epoch" too).
    training = out.split("train loader stats", 1)[0]
    per_epoch = [
        (int(e), int(b))
        for e, b in re.findall(r"(?m)^epoch (\d+):.*?(\d+) batches", training)
    ]
    assert [e for e, _ in per_epoch] == list(range(len(per_epoch))) and per_epoch, out
    assert len({b for _, b in per_epoch}) == 1 and per_epoch[0][1] > 0, out


@pytest.mark.timeout(300)
def test_train_iter_torch_batches_small_reaches_accuracy(example, capsys):
    acc = example("train_iter_torch_batches").main(["--small"])
    out = capsys.readouterr().out
    assert acc >= MIN_ACCURACY, out
    assert _number(r"val accuracy:\s*([0-9.]+)", out) == pytest.approx(acc, abs=1e-4)
    # Every epoch saw every training row once (the one-line migration changes no batch).
    training = out.split("train loader stats", 1)[0]
    rows = [int(r) for r in re.findall(r"(?m)^epoch \d+:.*?(\d+) rows", training)]
    assert len(rows) == 6 and set(rows) == {_train_rows(out)}, out


@pytest.mark.timeout(300)
def test_train_ray_train_small_reaches_accuracy(example, capsys):
    pytest.importorskip("lightning")
    acc = example("train_ray_train").main(["--small"])
    out = capsys.readouterr().out
    assert acc >= MIN_ACCURACY, out
    # Equal steps: both workers ran the same number of batches in the last epoch, and
    # together they saw every training row.
    m = re.search(r"per worker:\s*(\[.*\])", out)
    assert m, out
    per_worker = ast.literal_eval(m.group(1))
    assert len(per_worker) == 2 and len({b for b, _ in per_worker}) == 1, per_worker
    assert sum(r for _, r in per_worker) == _train_rows(out), out


@pytest.mark.timeout(400)
def test_train_ddp_small_reaches_accuracy(ray_session, tmp_path):
    pytest.importorskip("lightning")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env["RAY_ADDRESS"] = ray_session.get_runtime_context().gcs_address
    env.pop("TRD_EXAMPLE_DIGITS_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_ddp.py"), "--small", "--ckpt-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-6000:]
    acc = _number(r"val accuracy:\s*([0-9.]+)", out)
    assert acc >= MIN_ACCURACY, out
    # Each rank's split, parsed: the same batches per epoch on both ranks (len() agrees
    # with what ran), the training rows split between them, the val rows split with the
    # remainder dropped (equal steps), nothing lost.
    ranks = {}
    for m in re.finditer(
        r"\[rank (\d)\] train: (\d+) batches/epoch \(len\), last epoch (\d+) batches, "
        r"(\d+) rows, (\d+) dropped; val: (\d+) batches, (\d+) rows, (\d+) dropped",
        out,
    ):
        ranks[int(m.group(1))] = [int(g) for g in m.groups()[1:]]
    assert set(ranks) == {0, 1}, out
    (len0, b0, r0, d0, vb0, vr0, vd0), (len1, b1, r1, d1, vb1, vr1, vd1) = ranks[0], ranks[1]
    assert len0 == len1 == b0 == b1 and vb0 == vb1, out
    assert r0 + r1 + d0 + d1 == _train_rows(out), out
    assert vr0 == vr1 and vr0 + vr1 + vd0 + vd1 == int(_number(r"val rows (\d+)", out)), out
    # Checkpoints every 5 steps under Lightning DDP: RayDataModule.state_dict() gathered
    # both ranks' sets (a collective in every save). The last one, at step 135 of 138
    # (6 epochs x 23), is 20 batches into epoch 5 on each rank: 2 x 20 x 32 rows.
    import torch

    from torch_raydata.resume import ConsumedSet

    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["RayDataModule"]
    train = state["splits"]["train"]
    assert (train["world_size"], train["epoch"], train["batches_consumed"]) == (2, 5, 20)
    assert len(ConsumedSet.decode(train["consumed"])) == train["rows_consumed"] == 2 * 20 * 32
