"""``RayDataModule``: a Lightning DataModule over Ray Datasets (extra ``lightning``).

Owns: one :class:`~torch_raydata.RayIterableDataset` per split (train / val / test /
predict), built in ``setup()``; the options of each split (shared options, evaluation
defaults, per-split overrides); loaders Lightning can size; not copying a batch that
finalize already put on the training device; the loaders' state in checkpoints; closing
every running epoch when a stage ends or fails.

Does not own the pipeline (``dataset.py``) nor the split across DDP ranks
(``torch_raydata.distributed``: a Dataset is split at its first epoch; ``setup()`` only attaches
every rank to the same Ray cluster first).

Importing this module needs Lightning (``pip install 'torch_raydata[lightning]'``);
``import torch_raydata`` does not.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised in a subprocess without lightning
    raise ImportError(
        "torch_raydata.RayDataModule needs Lightning, which is not installed: "
        "pip install 'torch_raydata[lightning]'"
    ) from e

from . import distributed
from ._checks import check_bool
from .callbacks import LoaderStatsCallback  # noqa: F401 - re-exported
from .dataset import RayIterableDataset
from .kernels.nested import iter_leaves
from .transports import Transport, resolve_transport

__all__ = ["RayDataModule", "SPLITS", "EVAL_DEFAULTS"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "predict")

#: Options of the val / test / predict splits unless their ``*_options`` say otherwise:
#: every row once, in dataset order, no partial batch dropped.
EVAL_DEFAULTS: dict[str, Any] = {"shuffle_buffer_size": None, "drop_last": False, "preserve_order": True}

_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}

_OPTIONS = frozenset(
    name
    for name, p in inspect.signature(RayIterableDataset.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)

_STATE_VERSION = 1

# Lightning warns about any IterableDataset with __len__, for DataLoader *worker processes*
# that would each yield the whole dataset. RayIterableDataset refuses to run in worker
# processes (it has its own threads), so its len() is exact; the warning is noise.
_LEN_WARNING = r"Your `IterableDataset` has `__len__` defined"


def _on_device(batch: Any, device: torch.device) -> bool:
    """True when every tensor in ``batch`` (dicts, lists, tuples) is already on ``device``."""
    return all(
        t.device.type == device.type and (device.index is None or t.device.index == device.index)
        for t in iter_leaves(batch)
    )


class _ResumableLoader(DataLoader):
    """The train split's ``DataLoader``. Lightning warns that a mid-epoch checkpoint cannot
    resume a loader without ``state_dict``/``load_state_dict``; this one resumes exactly,
    but its state travels in ``RayDataModule.state_dict()`` (gathered over the ranks
    there), so the loader's own state is empty rather than a second copy of the ID set."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class RayDataModule(pl.LightningDataModule):
    """Lightning DataModule whose splits are Ray Datasets, fed by torch_raydata.

    Each split is a ``ray.data.Dataset``, a ``ray.data.DataIterator`` (e.g. a Ray Train
    shard), or a zero-argument callable returning one — called in ``setup()``, after every
    rank is attached to the run's Ray cluster (use a callable under Lightning DDP when the
    script does not call ``torch_raydata.distributed.init_ray()`` before ``trainer.fit``).

    Options: ``batch_size`` and ``**options`` (any ``RayIterableDataset`` keyword) apply to
    every split; val / test / predict then take :data:`EVAL_DEFAULTS` (no shuffle,
    ``drop_last=False``, ``preserve_order=True``); ``<split>_options`` override both for one
    split. So ``shuffle_buffer_size=...`` given once shuffles the train split only.
    ``device`` defaults to the trainer's device when finalize can place batches there
    (then Lightning's own copy is skipped), else the CPU (and Lightning moves them).

    Loaders are ``DataLoader(ds, batch_size=None)``: ``len()`` is known when the split's
    row count is (``ray.data.range``/``from_items``/materialized datasets, or
    ``num_rows=`` in its options), so the progress bar has a total and float
    ``limit_*_batches`` / ``val_check_interval`` work.

    Under DDP every rank gets its own shard, the same number of batches per epoch
    (see ``torch_raydata.distributed``); ``len()`` is per rank.

    Args:
        train, val, test, predict: the splits (None: no such split).
        batch_size: rows per batch, every split.
        train_options, val_options, test_options, predict_options: per-split
            ``RayIterableDataset`` options, over the shared ones and the eval defaults.
        strict_resume: passed as ``strict`` to the train split's ``load_state_dict`` when a
            checkpoint is loaded (False accepts a state that cannot resume exactly, e.g.
            of a shuffle without ``shuffle_seed``: a best-effort skip-ahead).
        **options: ``RayIterableDataset`` options for every split.

    Example:
        >>> dm = trd.RayDataModule(train=train_ds, val=val_ds, batch_size=128,
        ...                        shuffle_buffer_size=2048, shuffle_seed=0,
        ...                        train_options={"num_rows": 10_000})
        >>> trainer.fit(model, datamodule=dm)
        >>> print(dm.datasets["train"].stats())
    """

    def __init__(
        self,
        train: Any = None,
        val: Any = None,
        test: Any = None,
        predict: Any = None,
        *,
        batch_size: int = 256,
        train_options: Mapping[str, Any] | None = None,
        val_options: Mapping[str, Any] | None = None,
        test_options: Mapping[str, Any] | None = None,
        predict_options: Mapping[str, Any] | None = None,
        strict_resume: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        self.strict_resume = check_bool("strict_resume", strict_resume)
        from ray.data import DataIterator, Dataset

        self.inputs: dict[str, Any] = {"train": train, "val": val, "test": test, "predict": predict}
        for split, value in self.inputs.items():
            if value is not None and not (
                isinstance(value, (Dataset, DataIterator)) or callable(value)
            ):
                raise TypeError(
                    f"{split}={value!r} must be a ray.data.Dataset, a ray.data.DataIterator, "
                    "a zero-argument callable returning one, or None"
                )
        per_split = {
            "train": train_options,
            "val": val_options,
            "test": test_options,
            "predict": predict_options,
        }
        self.split_options: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            opts = {"batch_size": batch_size, **self._checked(options, "**options")}
            if split != "train":
                opts.update(EVAL_DEFAULTS)
            opts.update(self._checked(per_split[split] or {}, f"{split}_options"))
            self.split_options[split] = opts
        self._datasets: dict[str, RayIterableDataset] = {}
        self._pending_state: dict[str, dict[str, Any]] = {}
        # Train batches that reached the training step (went through
        # transfer_batch_to_device) in the current epoch run: (that run's progress, count).
        self._trained: tuple[Any, int] = (None, 0)
        # Hide the loader hooks of absent splits, so Lightning sees no such split (it
        # checks whether the hook is overridden, as with LightningDataModule.from_datasets).
        for split in SPLITS:
            if self.inputs[split] is None:
                hook = f"{split}_dataloader"
                setattr(self, hook, getattr(super(), hook))
        warnings.filterwarnings("ignore", message=_LEN_WARNING)

    @staticmethod
    def _checked(options: Mapping[str, Any], where: str) -> dict[str, Any]:
        if not isinstance(options, Mapping):
            raise TypeError(f"{where}={options!r} must be a dict of RayIterableDataset options")
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(
                f"{where} has unknown option(s) {unknown}; RayIterableDataset options are "
                f"{sorted(_OPTIONS)}"
            )
        return dict(options)

    # -- datasets --------------------------------------------------------------------------
    @property
    def datasets(self) -> Mapping[str, RayIterableDataset]:
        """The splits built so far (by ``setup()``), e.g. ``dm.datasets["train"].stats()``."""
        return dict(self._datasets)

    def _device_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        """Place batches on the trainer's device when a transport can (skips Lightning's copy)."""
        if "device" in opts or self.trainer is None:
            return opts
        device = self.trainer.strategy.root_device
        if device.type == "cpu":
            return {**opts, "device": device}
        spec = opts.get("transport", "auto")
        try:
            probe = resolve_transport(spec, device)
            if probe is not spec:  # one we made to check the device: ours to close
                probe.close()
        except ValueError as e:
            logger.info(
                "torch_raydata: batches stay on the CPU and Lightning moves them to %s (%s)",
                device, e,
            )
            return opts
        return {**opts, "device": device}

    def _build(self, split: str) -> RayIterableDataset:
        from ray.data import DataIterator, Dataset

        data = self.inputs[split]
        if not isinstance(data, (Dataset, DataIterator)):
            factory: Callable[[], Any] = data
            data = factory()
            if not isinstance(data, (Dataset, DataIterator)):
                raise TypeError(
                    f"the {split} factory {factory!r} returned {type(data).__name__}; it must "
                    "return a ray.data.Dataset or ray.data.DataIterator"
                )
        ds = RayIterableDataset(data, **self._device_options(self.split_options[split]))
        if split in self._pending_state:
            self._apply(ds, split, self._pending_state.pop(split))
        return ds

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Attach to the run's Ray cluster (collective under DDP) and build the stage's splits.

        Args:
            stage: "fit" (train + val), "validate", "test", "predict"; None: all splits.
        """
        import ray

        if distributed.world()[1] > 1 or not ray.is_initialized():
            distributed.init_ray()
        for split in _STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS:
            if self.inputs[split] is not None and split not in self._datasets:
                self._datasets[split] = self._build(split)

    def _loader(self, split: str) -> DataLoader:
        ds = self._datasets.get(split)
        if ds is None:
            if self.inputs[split] is None:
                raise RuntimeError(f"RayDataModule has no {split} split: pass {split}=... to it")
            self.setup(None)  # used outside a Trainer, e.g. dm.train_dataloader() directly
            ds = self._datasets[split]
        if split == "train":
            return _ResumableLoader(ds, batch_size=None)
        return DataLoader(ds, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        """``DataLoader(train dataset, batch_size=None)``: sized when its row count is known.
        Its loader state lives in this DataModule's ``state_dict()``."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """``DataLoader(val dataset, batch_size=None)``: sized when its row count is known."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """``DataLoader(test dataset, batch_size=None)``: sized when its row count is known."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """``DataLoader(predict dataset, batch_size=None)``: sized when its row count is known."""
        return self._loader("predict")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Return ``batch`` untouched when every tensor is already on ``device`` (finalize
        put it there); otherwise Lightning's default copy.

        Args:
            batch: what the loader yielded.
            device: the training device.
            dataloader_idx: index of the loader (unused).

        Returns:
            The batch on ``device`` — the same object when it already was.
        """
        trainer = self.trainer
        if trainer is not None and trainer.training and "train" in self._datasets:
            # Lightning calls this right before training_step: count what was trained on
            # (its fetcher may hold a batch more, see state_dict).
            train = self._datasets["train"]
            run = train._progress
            seen_run, count = self._trained
            self._trained = (run, count + 1 if run is seen_run else 1)
            self._prestart_val(train)
        if _on_device(batch, device):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _prestart_val(self, train: RayIterableDataset) -> None:
        """Near the end of a train epoch (once the train split has started its next epoch,
        i.e. its stream has ended or is about to), start the val split's next epoch, so
        validation does not wait for Ray's executor; the next train epoch is started by
        the train split itself while validation runs (``prestart``)."""
        val = self._datasets.get("val")
        if val is None or not train._next.pending or val._next.pending:
            return
        val.start_next_epoch(wait=False)  # off the step's thread

    def state_dict(self) -> dict[str, Any]:
        """Each built split's ``RayIterableDataset.state_dict()`` (goes into checkpoints).

        The train split's state counts only batches that reached the training step:
        Lightning's loop may hold one fetched batch more (it does when the loader has no
        ``len()``); that batch is not in the state and is yielded again after a resume.
        Under DDP this is a collective (Lightning calls it on every rank when it saves a
        checkpoint): the ranks' consumed-ID sets are merged, and every rank returns the
        same state, which resumes on any number of ranks.
        """
        splits = {}
        for split, ds in self._datasets.items():
            if split == "train":
                state = ds._state_dict(consumer_lag=self._train_lag(ds))
            else:
                state = ds.state_dict()
            splits[split] = distributed.gather_state_dict(state, spill_dir=ds.spill_dir)
        return {"version": _STATE_VERSION, "splits": splits}

    def _train_lag(self, ds: RayIterableDataset) -> int:
        """Batches the train split yielded this epoch that were not trained on yet."""
        run = ds._progress
        if run is None or self.trainer is None:  # used without a Trainer: nothing held back
            return 0
        seen_run, count = self._trained
        trained = count if run is seen_run else 0
        return max(0, run.batches_yielded - trained)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the splits' loader state (applied now, or when ``setup()`` builds them).

        The train split resumes where it was; evaluation splits keep their epoch count but
        restart from their first batch (an evaluation pass always runs whole).
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a RayDataModule state (version {_STATE_VERSION} expected): {state_dict!r:.200}"
            )
        for split, state in state_dict.get("splits", {}).items():
            if split not in SPLITS:
                raise ValueError(f"RayDataModule state has unknown split {split!r}; splits are {SPLITS}")
            if split != "train":  # an evaluation pass always runs whole: keep the epoch
                if not isinstance(state, Mapping) or not isinstance(state.get("epoch"), int):
                    raise ValueError(f"RayDataModule state of {split!r} has no epoch: {state!r:.200}")
                state = {"epoch": state["epoch"]}
            if split in self._datasets:
                self._apply(self._datasets[split], split, state)
            else:
                self._pending_state[split] = state

    def _apply(self, ds: RayIterableDataset, split: str, state: dict[str, Any]) -> None:
        if split == "train":
            ds.load_state_dict(state, strict=self.strict_resume)
        else:
            ds.set_epoch(state["epoch"])

    def _owns_transport(self, split: str) -> bool:
        """A transport the splits made from a name is theirs to close; an instance passed
        in (``transport=``, shared by every split) stays open for its owner to close."""
        return not isinstance(self.split_options[split].get("transport", "auto"), Transport)

    def teardown(self, stage: str | None = None) -> None:
        """Stop the running epochs of the stage's splits (their threads end here) and
        close their transports, unless a transport instance was passed in."""
        for split in _STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS:
            ds = self._datasets.get(split)
            if ds is not None:
                ds.close(close_transport=self._owns_transport(split))

    def on_exception(self, exception: BaseException) -> None:
        """Stop every running epoch when training fails."""
        for split, ds in self._datasets.items():
            ds.close(close_transport=self._owns_transport(split))
