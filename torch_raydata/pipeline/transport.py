"""The Transport interface: how finalize (stage 6) moves collated batches to the device.

Stage 6 declares what it needs here; ``torch_raydata/transports/`` holds the
implementations (local, cuda, nixl), so the pipeline never imports them.

After upstream Ray #61773: ``fetch_multiple`` posts the transfers of several batches at
once and returns at once; ``wait_fetch_complete`` waits for them. The default
``fetch_multiple`` does the work synchronously through :meth:`Transport.fetch`, so a
simple transport overrides only ``fetch``.

A transport sees batch *payloads* (whatever the collate_fn returned, typically a dict of
tensors), never the pipeline's bookkeeping.

A transport that also *collates* (next to the data, in workers of its own) declares
:class:`RemoteCollate`: the dataset then runs the transport's own epoch instead of the
local stages 2-6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Transport", "FetchRequest", "RemoteCollate", "TransportStats"]


@dataclass
class FetchRequest:
    """A handle on posted transfers. ``results`` is filled by synchronous transports;
    asynchronous ones keep their own state in ``handle``."""

    batches: list[Any]
    results: list[Any] | None = None
    handle: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TransportStats:
    """Staging memory of a transport, over its lifetime (all epochs and datasets using it).

    ``pinned_bytes_in_use``: pinned bytes held by batches (collated, being copied, or
    waiting for a copy to complete); ``pinned_bytes_reserved``: pinned bytes the transport
    holds in all (in use + free for reuse). ``pageable_fallbacks``: reason -> tensors
    staged in pageable memory instead (``"budget"``: the pinned budget was in use;
    ``"pin_failed"``: pinning failed; ``"not_staged"``: the collate_fn returned tensors
    not allocated by the transport, copied from pageable memory).
    """

    pinned_bytes_in_use: int = 0
    pinned_bytes_reserved: int = 0
    pageable_fallbacks: dict[str, int] = field(default_factory=dict)


class Transport:
    """Base class. Subclasses override :meth:`fetch` (synchronous) or both
    :meth:`fetch_multiple` and :meth:`wait_fetch_complete` (asynchronous)."""

    #: True when finalize should run on its own thread (transfers overlap the step).
    #: A no-op transport sets False and finalize runs inline on the consumer thread,
    #: saving a queue hop per batch.
    needs_thread: bool = True

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def fetch(self, batch: Any) -> Any:
        """Move one batch; synchronous. The default returns it unchanged."""
        return batch

    def fetch_multiple(self, batches: list[Any]) -> FetchRequest:
        """Post the transfers of ``batches`` and return without waiting (the default
        does the work now)."""
        return FetchRequest(batches=batches, results=[self.fetch(b) for b in batches])

    def wait_fetch_complete(self, request: FetchRequest, timeout: float | None = None) -> list[Any]:
        """Wait until ``request``'s batches are on the device; return them in order.
        Raises ``TimeoutError`` if ``timeout`` seconds pass first."""
        if request.results is None:
            raise RuntimeError(
                f"{type(self).__name__} posted a request it cannot complete: override "
                "wait_fetch_complete together with fetch_multiple"
            )
        return request.results

    #: Optional ``(shape, dtype) -> torch.Tensor`` the default collate writes into (e.g.
    #: pinned staging memory), so the one host copy lands where the transfer reads it.
    host_allocator: Any = None

    def on_consume(self, data: Any) -> Any:
        """Called on the *training step's* thread just before it receives ``data``.
        Device transports make the consumer's current stream wait for the transfer here."""
        return data

    def memory_stats(self) -> TransportStats:
        """Staging memory held and fallbacks (reported in ``RayIterableDataset.stats()``)."""
        return TransportStats()

    def close(self) -> None:
        """Free buffers and connections (called by ``RayIterableDataset.close()``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"


@runtime_checkable
class RemoteCollate(Protocol):
    """A :class:`Transport` whose collate_fn runs in remote workers next to the data
    (:class:`~torch_raydata.transports.NixlTransport`).

    ``RayIterableDataset`` checks ``isinstance(transport, RemoteCollate)`` and runs
    ``transport.epoch_class()`` (same arguments as ``pipeline.run.EpochRun``) instead of
    the local stages 2-6; the rest are the members that epoch calls on the transport.
    """

    #: Transfers posted together; also the batches the epoch collects before posting.
    in_flight: int

    def epoch_class(self) -> Callable[..., Any]:
        """The epoch to run: ``(blocks, fetcher, collate_fn, transport, config, **kw)``."""
        ...

    def acquire_workers(
        self, collate_fn: Callable[[Any], Any], *, id_column: str | None, max_slabs: int
    ) -> list[tuple[Any, str]]:
        """Workers for one epoch, as ``(handle, name)`` pairs; the epoch hands them back
        with :meth:`release_workers` when it ends."""
        ...

    def release_workers(self, workers: list[tuple[Any, str]], *, reusable: bool) -> None:
        """The epoch is over: keep ``workers`` for the next one (``reusable``: they hold no
        work of this epoch any more) or stop them (a worker failed)."""
        ...

    def fetch_multiple(self, batches: list[Any]) -> FetchRequest:
        """Post the transfers of the workers' batch descriptors (see :class:`Transport`)."""
        ...

    def wait_fetch_complete(self, request: FetchRequest, timeout: float | None = None) -> list[Any]:
        """Wait for ``request``'s transfers (see :class:`Transport`)."""
        ...

    def abort(self, request: FetchRequest) -> None:
        """Cancel ``request``'s transfers that have not completed and free their buffers."""
        ...

    def on_consume(self, data: Any) -> Any:
        """Called on the training step's thread before it receives ``data`` (see
        :class:`Transport`)."""
        ...
