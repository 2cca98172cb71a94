"""What ``RayIterableDataset`` checks at its edges, so that misuse is loud, never silent.

Owns the rules (and their messages) for:

* who iterates the dataset: not a DataLoader worker process (Ray calls hang there), not a
  DataLoader that batches again (``DataLoader(ds)`` without ``batch_size=None`` would give
  every tensor a leading dimension of 1); :func:`make_loader` is the right way;
* peeks: an iteration that stops after at most one batch (``next(iter(loader))``) does not
  use up its epoch (:func:`is_peek`);
* states that cannot resume exactly (:func:`mark_reproducible`, :func:`check_loadable`).

Does not own the epochs themselves (``dataset.py``) nor the state's format
(``resume/state.py``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch.utils.data.dataloader
from torch.utils.data import DataLoader, get_worker_info

__all__ = [
    "check_caller",
    "check_loadable",
    "is_peek",
    "make_loader",
    "mark_reproducible",
]

# Frames between RayIterableDataset.__iter__ and the DataLoader that calls it: the
# fetcher's __init__, create_fetcher, the loader iterator's __init__, _get_iterator,
# DataLoader.__iter__ (torch 2.x); a few more for subclasses (Lightning, torchdata).
_LOADER_FRAMES = 10

_DATALOADER_FILE = torch.utils.data.dataloader.__file__

_LOADER_ARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "num_workers")


def check_caller(batch_size: int) -> None:
    """Raise when the dataset is iterated where it cannot work: a DataLoader worker
    process, or a DataLoader that would batch the batches again. Call from ``__iter__``."""
    if get_worker_info() is not None:
        raise RuntimeError(
            "RayIterableDataset is running inside a DataLoader worker process: Ray calls in "
            "forked workers hang (Ray #13407). Use ds.loader() (or DataLoader(ds, "
            "batch_size=None, num_workers=0)) and set RayIterableDataset(num_workers=...) for "
            "parallel collate."
        )
    loader = _calling_loader(sys._getframe(2))
    if loader is not None and loader.batch_sampler is not None:
        raise ValueError(
            f"DataLoader(ds, batch_size={loader.batch_size!r}) would collate "
            f"{loader.batch_size} of this dataset's batches (already {batch_size} rows each) "
            "into one, giving every tensor a leading dimension: use ds.loader(), or "
            "DataLoader(ds, batch_size=None). Set the rows per batch with "
            "RayIterableDataset(batch_size=...)."
        )


def _calling_loader(frame: Any) -> DataLoader | None:
    """The DataLoader whose iterator is calling ``iter(dataset)``, if any.

    Torch gives an IterableDataset no way to know how it is iterated (``get_worker_info``
    is None in the main process), so look up the caller's frames for torch's DataLoader
    code (``DataLoader.__iter__`` and its iterator's ``__init__``, which every subclass
    runs) and take the loader there: its public ``batch_sampler`` says whether it batches
    again (auto-collation). Only those frames' locals are read: reading a user frame's
    would keep its locals alive (CPython caches them on the frame)."""
    for _ in range(_LOADER_FRAMES):
        if frame is None:
            return None
        if frame.f_code.co_filename == _DATALOADER_FILE:
            local = frame.f_locals
            for name in ("self", "loader"):
                obj = local.get(name)
                if isinstance(obj, DataLoader):
                    return obj
        frame = frame.f_back
    return None


def make_loader(dataset: Any, **kwargs: Any) -> DataLoader:
    """``DataLoader(dataset, batch_size=None, **kwargs)``, refusing the arguments that
    would batch, shuffle or fork again (the dataset does these itself)."""
    for name in _LOADER_ARGS:
        if name not in kwargs:
            continue
        value = kwargs[name]
        if name == "batch_size" and value is None or name != "batch_size" and not value:
            continue
        fix = {
            "batch_size": "RayIterableDataset(batch_size=...)",
            "shuffle": "RayIterableDataset(shuffle_buffer_size=..., shuffle_seed=...)",
            "sampler": "RayIterableDataset options (it streams; there is nothing to sample)",
            "batch_sampler": "RayIterableDataset(batch_size=...)",
            "drop_last": "RayIterableDataset(drop_last=True)",
            "num_workers": "RayIterableDataset(num_workers=...) (threads; worker processes "
            "would hang in Ray calls, Ray #13407)",
        }[name]
        raise ValueError(f"ds.loader({name}={value!r}): the dataset does this itself; use {fix}")
    kwargs.pop("batch_size", None)
    return DataLoader(dataset, batch_size=None, **kwargs)


def is_peek(progress: Any, running: bool) -> bool:
    """An iteration that stopped after at most one batch without finishing its epoch
    (``next(iter(loader))``, or a loop that breaks at its first batch): it does not use up
    the epoch, so the next ``iter()`` runs the same epoch from its start, same shuffle."""
    return (
        progress is not None
        and not running
        and progress.batches_yielded <= 1
        and not progress.finished()
    )


def mark_reproducible(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """Flag (and warn about) a state that cannot resume exactly: taken mid-epoch of a
    shuffle with no ``shuffle_seed`` and no ``id_column``, its rows already consumed cannot
    be told apart from the others, so a resume repeats some and never gives others."""
    lost = (
        config.id_column is None
        and config.shuffle_buffer_size is not None
        and config.shuffle_seed is None
        and state["batches_consumed"] > 0
    )
    state["reproducible"] = not lost
    if lost:
        warnings.warn(
            f"loader state taken after {state['batches_consumed']} batches of epoch "
            f"{state['epoch']} of a shuffle without shuffle_seed and without id_column "
            "cannot resume exactly: the resumed epoch would repeat some rows and never give "
            "others. Set shuffle_seed (or id_column for exact resume by row ID); "
            "load_state_dict refuses this state unless strict=False",
            RuntimeWarning,
            stacklevel=3,
        )
    return state


def check_loadable(state: Any, strict: bool) -> None:
    """Refuse a state flagged by :func:`mark_reproducible` unless ``strict=False``."""
    if strict and isinstance(state, dict) and state.get("reproducible") is False:
        raise ValueError(
            f"this loader state (epoch {state.get('epoch')}, "
            f"{state.get('batches_consumed')} batches consumed) was taken mid-epoch of a "
            "shuffle without shuffle_seed and without id_column: resuming it would repeat "
            "some rows and never give others. Pass strict=False to accept that (a "
            "best-effort skip-ahead), or start the epoch over; set shuffle_seed (or "
            "id_column) so that future states resume exactly"
        )
