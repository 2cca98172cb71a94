"""RayDataModule with a real Lightning Trainer on a small local Ray (CPU, one process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import torch_raydata as trd  # noqa: E402
from torch_raydata.lightning import EVAL_DEFAULTS, RayDataModule  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_session")

FEATURES = 4


def _ds(n: int):
    import ray

    def features(b):
        ids = b["id"]
        x = np.stack([ids * (k + 1) % 7 for k in range(FEATURES)], axis=1).astype(np.float32)
        return {"id": ids, "x": x, "y": (ids % 2).astype(np.int64)}

    return ray.data.range(n, override_num_blocks=3).map_batches(features, batch_format="numpy")


class Recorder(pl.LightningModule):
    """A linear model that records what each step received."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(FEATURES, 2)
        self.seen: dict[str, list] = {"train": [], "val": [], "test": []}
        self.before_transfer: list[torch.Tensor] = []
        self.same_object: list[bool] = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.before_transfer.append(batch["x"])
        return batch

    def _step(self, split, batch):
        self.seen[split].append(batch["id"].clone())
        return torch.nn.functional.cross_entropy(self.layer(batch["x"]), batch["y"])

    def training_step(self, batch, batch_idx):
        x = self.before_transfer[-1]
        self.same_object.append(batch["x"] is x and batch["x"].data_ptr() == x.data_ptr())
        return self._step("train", batch)

    def validation_step(self, batch, batch_idx):
        self._step("val", batch)

    def test_step(self, batch, batch_idx):
        self._step("test", batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kw):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _ids(seen):
    return torch.cat(seen).tolist() if seen else []


def test_fit_validate_test_with_known_length_and_limit_train_batches():
    dm = RayDataModule(
        train=_ds(200), val=_ds(90), test=_ds(70), batch_size=32, num_workers=2,
        shuffle_buffer_size=64, shuffle_seed=0,
        train_options={"num_rows": 200}, val_options={"num_rows": 90}, test_options={"num_rows": 70},
    )
    model = Recorder()
    trainer = _trainer(max_epochs=2, limit_train_batches=3)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 3  # limit respected; len() (7) is known
    assert len(model.seen["train"]) == 6  # 3 per epoch, 2 epochs
    assert trainer.num_val_batches == [3]  # ceil(90 / 32): sized from len()
    # val: every row once per pass, in dataset order (eval defaults), for each of 2 epochs
    assert _ids(model.seen["val"]) == list(range(90)) * 2

    model.seen["val"].clear()
    trainer.validate(model, datamodule=dm)
    assert _ids(model.seen["val"]) == list(range(90))
    trainer.test(model, datamodule=dm)
    assert _ids(model.seen["test"]) == list(range(70))
    assert dm.datasets["val"].stats().batches == 3


class _CountingTransport(trd.transports.LocalTransport):
    def __init__(self):
        super().__init__()
        self.closes = 0

    def close(self):
        self.closes += 1


def test_a_transport_instance_passed_in_is_shared_and_never_closed_by_the_module():
    mine = _CountingTransport()
    dm = RayDataModule(train=_ds(64), val=_ds(32), batch_size=16, num_workers=1, transport=mine)
    trainer = _trainer(max_epochs=1)
    trainer.fit(Recorder(), datamodule=dm)
    assert dm.datasets["train"].transport is mine and dm.datasets["val"].transport is mine
    dm.teardown(None)
    dm.on_exception(RuntimeError("step failed"))
    assert mine.closes == 0  # the user's: shared by both splits, closed by its owner
    named = RayDataModule(train=_ds(32), batch_size=16, num_workers=1)
    named.setup("fit")
    made = named.datasets["train"].transport
    closes = []
    made.close = lambda: closes.append(1)
    named.teardown("fit")
    assert closes == [1]  # one the module made from a name is its own to close


@pytest.mark.parametrize("sanity", [0, 2])
def test_epochs_after_the_first_start_ahead_and_stay_exact(sanity):
    """Each split's next epoch is started while the current one runs (train: its own
    stream's end; val: near the end of each train epoch): epochs after the first are
    prestarted, and every epoch still has every row once, val in dataset order, with the
    sanity check and limit_val_batches cutting val passes short."""
    dm = RayDataModule(
        train=_ds(200), val=_ds(90), batch_size=32, num_workers=2,
        shuffle_buffer_size=64, shuffle_seed=0,
        train_options={"num_rows": 200}, val_options={"num_rows": 90},
    )
    model = Recorder()
    trainer = _trainer(max_epochs=3)
    trainer.num_sanity_val_steps = sanity
    trainer.fit(model, datamodule=dm)
    train_ids = _ids(model.seen["train"])
    for e in range(3):
        assert sorted(train_ids[e * 200 : (e + 1) * 200]) == list(range(200))
    val_ids = _ids(model.seen["val"])
    assert val_ids[len(val_ids) - 270 :] == list(range(90)) * 3  # after the sanity steps
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert train._next.used == 2  # epochs 1 and 2
    assert val._next.used >= 2  # at least val passes 1 and 2 (and 0 after a sanity check)
    assert not train._next.pending and not val._next.pending  # teardown closed them

    # Cut val passes short: what was prestarted is claimed or torn down, never leaked.
    dm = RayDataModule(
        train=_ds(200), val=_ds(90), batch_size=32, num_workers=2,
        train_options={"num_rows": 200}, val_options={"num_rows": 90},
    )
    model = Recorder()
    trainer = _trainer(max_epochs=2, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    assert _ids(model.seen["val"]) == list(range(32)) * 2
    assert not dm.datasets["val"]._next.pending


def test_float_limit_and_full_epoch_use_len():
    dm = RayDataModule(train=_ds(256), batch_size=32, num_workers=2, train_options={"num_rows": 256})
    model = Recorder()
    trainer = _trainer(max_epochs=1, limit_train_batches=0.5, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 4 and len(model.seen["train"]) == 4

    dm = RayDataModule(train=_ds(256), batch_size=32, num_workers=2, train_options={"num_rows": 256})
    model = Recorder()
    trainer = _trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 8
    assert sorted(_ids(model.seen["train"])) == list(range(256))


def test_unknown_length_still_trains():
    dm = RayDataModule(train=_ds(100), batch_size=32, num_workers=2)
    model = Recorder()
    trainer = _trainer(max_epochs=1, limit_val_batches=0)
    with pytest.raises(TypeError, match="len\\(\\) is unknown"):
        len(dm.train_dataloader())
    trainer.fit(model, datamodule=dm)
    assert sorted(_ids(model.seen["train"])) == list(range(100))


def test_batch_already_on_device_is_not_copied(monkeypatch):
    calls = []
    default = pl.LightningDataModule.transfer_batch_to_device

    def counting(self, batch, device, idx):
        calls.append(device)
        return default(self, batch, device, idx)

    monkeypatch.setattr(pl.LightningDataModule, "transfer_batch_to_device", counting)
    dm = RayDataModule(train=_ds(64), batch_size=16, num_workers=2)
    model = Recorder()
    _trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm)
    assert dm.datasets["train"].device == torch.device("cpu")  # the trainer's device
    assert len(model.same_object) == 4 and all(model.same_object)  # same tensor, same memory
    assert calls == []  # Lightning's copy was skipped

    # A batch that is not on the target device still goes through Lightning's copy.
    batch = {"x": torch.zeros(2)}
    meta = torch.device("meta")
    out = dm.transfer_batch_to_device(batch, meta, 0)
    assert calls == [meta] and out["x"].device == meta


def test_options_eval_defaults_and_overrides():
    dm = RayDataModule(
        train=_ds(10), val=_ds(10), batch_size=8, shuffle_buffer_size=100, drop_last=True,
        val_options={"batch_size": 4, "preserve_order": False},
    )
    assert dm.split_options["train"] == {"batch_size": 8, "shuffle_buffer_size": 100, "drop_last": True}
    assert dm.split_options["val"] == {**EVAL_DEFAULTS, "batch_size": 4, "preserve_order": False}
    assert dm.split_options["test"] == {**EVAL_DEFAULTS, "batch_size": 8}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['shuffle'\]"):
        RayDataModule(train=_ds(10), shuffle=True)
    with pytest.raises(ValueError, match=r"val_options has unknown option\(s\) \['bs'\]"):
        RayDataModule(val=_ds(10), val_options={"bs": 3})
    with pytest.raises(TypeError, match="train=.*must be a ray.data.Dataset"):
        RayDataModule(train=[1, 2, 3])


def test_absent_splits_are_not_offered_to_lightning():
    from lightning.pytorch.utilities.model_helpers import is_overridden

    dm = RayDataModule(train=_ds(10))
    assert is_overridden("train_dataloader", dm, pl.LightningDataModule)
    for split in ("val", "test", "predict"):
        assert not is_overridden(f"{split}_dataloader", dm, pl.LightningDataModule)


def test_factory_is_called_in_setup_and_loader_works_without_trainer():
    calls = []

    def make():
        calls.append(1)
        return _ds(50)

    dm = RayDataModule(train=make, batch_size=25, num_workers=1)
    assert calls == []
    ids = [b["id"] for b in dm.train_dataloader()]
    assert calls == [1] and sorted(torch.cat(ids).tolist()) == list(range(50))
    with pytest.raises(TypeError, match="factory .* returned list"):
        RayDataModule(train=lambda: [1]).setup("fit")


def test_state_dict_forwards_to_the_datasets():
    dm = RayDataModule(train=_ds(64), val=_ds(32), batch_size=16, num_workers=1)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    next(it)
    state = dm.state_dict()
    assert state["splits"]["train"]["epoch"] == 0
    assert state["splits"]["train"]["batches_consumed"] == 2
    assert state["splits"]["val"]["batches_consumed"] == 0
    dm.teardown("fit")

    fresh = RayDataModule(train=_ds(64), val=_ds(32), batch_size=16, num_workers=1)
    fresh.load_state_dict(state)  # before setup: applied when the split is built
    fresh.setup("fit")
    rest = list(fresh.train_dataloader())
    assert len(rest) == 2 and fresh.datasets["train"].stats().epoch == 0
    with pytest.raises(ValueError, match="not a RayDataModule state"):
        fresh.load_state_dict({"epoch": 1})


def test_import_without_lightning_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['lightning.pytorch'] = None\n"
        "import torch_raydata as trd\n"
        "assert 'lightning' not in {m for m, v in sys.modules.items() if v is not None}\n"
        "try:\n"
        "    trd.RayDataModule\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'torch_raydata[lightning]'" in out.stdout


def test_lazy_attribute():
    assert trd.RayDataModule is RayDataModule
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trd.nope  # noqa: B018


# -- exact resume through Lightning checkpoints (subprocess, SIGKILL) -----------------------
RESUME_SCRIPT = Path(__file__).parent / "scripts" / "lightning_resume.py"
ROWS, BATCH = 1152, 32  # 36 batches per epoch: step 36 is the last batch of epoch 0


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this checkout's package
    return subprocess.run(
        [sys.executable, str(RESUME_SCRIPT), *args], env=env, capture_output=True, text=True,
        timeout=240,
    )


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ckpt_set(path: Path) -> tuple[dict, np.ndarray]:
    from torch_raydata.resume import ConsumedSet

    state = torch.load(path, weights_only=False)["RayDataModule"]["splits"]["train"]
    return state, ConsumedSet.decode(state["consumed"]).sorted_keys().astype(np.int64)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("known_length", [False, True], ids=["fetch-ahead", "known-len"])
def test_sigkill_then_fit_from_checkpoint_is_exact(tmp_path, known_length):
    """ModelCheckpoint(every_n_train_steps=4); the process is SIGKILLed in step 40 (epoch
    1). Resumed with fit(ckpt_path=...) from a mid-epoch checkpoint and from the one taken
    after the last batch of epoch 0: every row of each epoch is trained on exactly once,
    counting the checkpoint's consumed set, and no epoch is skipped or repeated.
    Without a known length Lightning fetches one batch ahead of the training step: that
    batch must not be in the checkpoint (it is trained on after the resume)."""
    flag = ["--known-length"] if known_length else []
    common = ["--rows", str(ROWS), *flag]
    r = _script("train", str(tmp_path), "--kill-at", "40", *common)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    trained = _steps(tmp_path / "train.jsonl")
    assert [s["step"] for s in trained] == list(range(40))
    ckpts = tmp_path / "ckpt"

    # The checkpoint's set is exactly the rows of the steps before it (not the one fetched
    # ahead), and its counters agree.
    state, in_ckpt = _ckpt_set(ckpts / "step=8.ckpt")
    before = sorted(i for s in trained if s["step"] < 8 for i in s["ids"])
    assert in_ckpt.tolist() == before
    assert (state["epoch"], state["batches_consumed"], state["rows_consumed"]) == (0, 8, 8 * BATCH)

    # Mid-epoch 0: the rest of epoch 0, then epoch 1 in full.
    r = _script("resume", str(tmp_path), "--resume-from", "step=8.ckpt", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not resumable" not in r.stderr
    after = _steps(tmp_path / "resume.jsonl")
    assert after[0]["step"] == 8
    epoch0 = np.array([i for s in after if s["epoch"] == 0 for i in s["ids"]])
    both = np.concatenate([in_ckpt, epoch0])
    assert len(both) == len(np.unique(both)) == ROWS
    epoch1 = [i for s in after if s["epoch"] == 1 for i in s["ids"]]
    assert sorted(epoch1) == list(range(ROWS))
    assert {s["epoch"] for s in after} == {0, 1}

    # After the last batch of epoch 0: nothing of epoch 0 again, epoch 1 in full, no third.
    (tmp_path / "resume.jsonl").unlink()
    state, in_ckpt = _ckpt_set(ckpts / "step=36.ckpt")
    assert (state["epoch"], len(in_ckpt)) == (1, 0)
    r = _script("resume", str(tmp_path), "--resume-from", "step=36.ckpt", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _steps(tmp_path / "resume.jsonl")
    assert {s["epoch"] for s in after} == {1}
    assert sorted(i for s in after for i in s["ids"]) == list(range(ROWS))
