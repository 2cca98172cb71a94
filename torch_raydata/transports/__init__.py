"""Transports for stage 6 (finalize): a strategy folder, one file per transport.

``resolve_transport(spec, device)`` turns the ``transport=`` argument of
``RayIterableDataset`` into an instance: ``"auto"`` picks ``"cuda"`` for a CUDA device,
else ``"local"``; a :class:`Transport` instance is used as given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import FetchRequest, RemoteCollate, Transport
from .cuda import CudaTransport
from .local import LocalTransport
from .nixl import NixlTransport

__all__ = [
    "Transport",
    "FetchRequest",
    "RemoteCollate",
    "LocalTransport",
    "CudaTransport",
    "NixlTransport",
    "TRANSPORTS",
    "resolve_transport",
]

TRANSPORTS: dict[str, Callable[..., Transport]] = {
    "local": LocalTransport,
    "cuda": CudaTransport,
    "nixl": NixlTransport,  # needs the `nixl` extra; checked when constructed
}

# Transports whose implementation lands later; named here so the error says so plainly.
_NOT_YET: set[str] = set()


def resolve_device(device: Any) -> torch.device:
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
            )
        if dev.index is None:
            # Fix the index now: a bare "cuda" resolved later on the finalize thread can pick
            # a different GPU than the training step's (Ray #65059).
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_transport(spec: Any, device: Any) -> Transport:
    dev = resolve_device(device)
    if isinstance(spec, Transport):
        if device is not None and spec.device != dev:
            raise ValueError(
                f"transport {spec!r} moves batches to {spec.device}, but {device=}; pass the "
                "same device to both, or leave device=None"
            )
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"transport={spec!r} must be 'auto', one of {sorted(TRANSPORTS | dict.fromkeys(_NOT_YET))} "
            "or a torch_raydata.transports.Transport instance"
        )
    name = spec
    if name == "auto":
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(
                f"{device=}: transport='auto' delivers to 'cpu' or 'cuda' devices only; for "
                f"{dev.type!r} pass your own torch_raydata.transports.Transport as transport="
            )
        name = "cuda" if dev.type == "cuda" else "local"
    if name in TRANSPORTS:
        return TRANSPORTS[name](dev)
    if name in _NOT_YET:
        raise ValueError(
            f"transport={spec!r} (resolved to {name!r}) is not available in this version of "
            "torch_raydata; use transport='local' with a CPU device, or pass your own "
            "torch_raydata.transports.Transport"
        )
    raise ValueError(
        f"transport={spec!r} is unknown; use 'auto', one of {sorted(TRANSPORTS)} or a "
        "Transport instance"
    )
