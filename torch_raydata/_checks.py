"""Option validation, one way for the whole package.

Owns the checks of user-facing options (ints, bools, devices) and their error messages,
which name the value and the rule (``batch_size=0 must be an int >= 1``). Does not own
the option defaults nor what an option does (the classes that take them). Imports no
other module of the package, so every layer may use it.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

__all__ = ["check_bool", "check_int", "resolve_device"]


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    """``value`` as a Python int, if it is an integer (numpy integers too, never a bool)
    ``>= minimum`` (or None with ``allow_none``); else ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    rule = f"must be an int >= {minimum}" + (" or None" if allow_none else "")
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} {rule}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} {rule}") from None
    if number < minimum:
        raise ValueError(f"{name}={value!r} {rule}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool if it is one (numpy bools too); else ValueError."""
    # bool("no") is True: a string or None here is a mistake, not a truth value.
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} must be True or False")
    return bool(value)


def resolve_device(device: Any, *, hint: str = "") -> torch.device:
    """The ``device=`` option as a ``torch.device`` (None: CPU), a bare ``"cuda"`` fixed
    to the current GPU now; ValueError for a non-device or CUDA not available (``hint``
    is appended to that message)."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{device=} is not a device: use None, 'cpu', 'cuda', 'cuda:1' or a torch.device"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{device=} but CUDA is not available in this process; use device=None/'cpu'"
                + hint
            )
        if dev.index is None:
            # Fix the index now: a bare "cuda" resolved later on the finalize thread can pick
            # a different GPU than the training step's (Ray #65059).
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev
