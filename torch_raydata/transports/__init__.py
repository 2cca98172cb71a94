"""Transports for stage 6 (finalize): a strategy folder, one file per transport.

``resolve_transport(spec, device)`` turns the ``transport=`` argument of
``RayIterableDataset`` into an instance: ``"auto"`` picks ``"cuda"`` for a CUDA device,
else ``"local"``; a :class:`Transport` instance is used as given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._checks import resolve_device
from ..pipeline.transport import FetchRequest, RemoteCollate, Transport
from .cuda import CudaTransport
from .local import LocalTransport
from .nixl import NixlTransport
from .shm import ShmMapError, ShmTransport

__all__ = [
    "Transport",
    "FetchRequest",
    "RemoteCollate",
    "LocalTransport",
    "CudaTransport",
    "NixlTransport",
    "ShmTransport",
    "ShmMapError",
    "TRANSPORTS",
    "resolve_transport",
]

TRANSPORTS: dict[str, Callable[..., Transport]] = {
    "local": LocalTransport,
    "cuda": CudaTransport,
    "nixl": NixlTransport,  # needs the `nixl` extra; checked when constructed
    "shm": ShmTransport,  # Linux; collate actors on this node
}


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
            f"transport={spec!r} must be 'auto', one of {sorted(TRANSPORTS)} "
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
    raise ValueError(
        f"transport={spec!r} is unknown; use 'auto', one of {sorted(TRANSPORTS)} or a "
        "Transport instance"
    )
