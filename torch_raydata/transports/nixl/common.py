"""What both ends of the NIXL transport share: the import, the descriptor, the payload codec.

Owns: importing ``nixl`` (an optional extra) with an error that names the extra; the
:class:`RemoteBatch` descriptor a collate actor returns through Ray (small: names, offsets,
shapes, non-tensor values inline; the tensor bytes stay in the actor's registered memory
until the trainer READs them); and turning a collated payload into ``(skeleton, tensors)``
and back. Does not own memory (``worker.py`` on the actor, ``pool.py`` on the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...kernels.nested import map_leaves

__all__ = [
    "ALIGN",
    "NIXL_EXTRA",
    "RemoteBatch",
    "TensorSpec",
    "align",
    "flatten_payload",
    "import_nixl",
    "release_message",
    "released_slabs",
    "unflatten_payload",
]

NIXL_EXTRA = "pip install 'torch_raydata[nixl]'"

#: Every tensor starts on a 64-byte boundary of its buffer (any dtype view is aligned).
ALIGN = 64


def align(n: int, quantum: int = ALIGN) -> int:
    return (n + quantum - 1) // quantum * quantum


def import_nixl() -> tuple[Any, Any]:
    """``(nixl_agent, nixl_agent_config)``; ImportError naming the extra when missing."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise ImportError(
            f"transport='nixl' needs the NIXL library, which is not importable here ({e}); "
            f"install the extra: {NIXL_EXTRA}"
        ) from e
    return nixl_agent, nixl_agent_config


_RELEASE = b"trd-release:"


def release_message(slabs: list[int]) -> bytes:
    """The notification telling an actor its ``slabs`` were READ and may be reused."""
    return _RELEASE + b",".join(b"%d" % s for s in slabs)


def released_slabs(msg: bytes) -> list[int]:
    """Inverse of :func:`release_message`; [] for any other message."""
    msg = bytes(msg)
    if not msg.startswith(_RELEASE):
        return []
    try:
        return [int(x) for x in msg[len(_RELEASE) :].split(b",") if x]
    except ValueError:
        return []


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a batch: ``nbytes`` at ``offset`` of the batch's buffer."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class RemoteBatch:
    """What a collate actor returns for one batch (travels through Ray; a few hundred bytes).

    ``addr``/``nbytes``: the packed tensors in the actor's registered buffer ``slab``, which
    the actor reuses once the trainer's notification names it (:func:`release_message`, sent
    after the READ completed). ``metadata``: the actor agent's NIXL metadata at version
    ``md_version`` (the trainer loads it when newer than what it has: a new buffer was
    registered). ``skeleton``: the payload with each tensor replaced by its index.
    """

    idx: int
    agent: str
    md_version: int
    metadata: bytes
    slab: int
    addr: int
    nbytes: int
    tensors: tuple[TensorSpec, ...]
    skeleton: Any
    num_rows: int
    ids: np.ndarray | None = None
    seconds: float = 0.0  # the actor's busy time for this batch (stats)


class _Slot:
    """Placeholder for tensor ``i`` inside a skeleton."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_Slot, (self.i,))


def flatten_payload(payload: Any) -> tuple[Any, list[torch.Tensor]]:
    """``payload`` -> (skeleton with ``_Slot`` placeholders, tensors in slot order)."""
    tensors: list[torch.Tensor] = []

    def take(t: torch.Tensor) -> _Slot:
        if t.device.type != "cpu":
            raise ValueError(
                f"collate_fn returned a tensor on {t.device}; on the remote (nixl) path it "
                "must return CPU tensors (the transport moves them)"
            )
        tensors.append(t)
        return _Slot(len(tensors) - 1)

    return map_leaves(payload, take, torch.Tensor), tensors


def unflatten_payload(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    return map_leaves(skeleton, lambda s: tensors[s.i], _Slot)
