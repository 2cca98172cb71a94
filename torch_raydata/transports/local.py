"""LocalTransport: batches stay in host memory (CPU training). A no-op, run inline."""

from __future__ import annotations

from typing import Any

from ..pipeline.transport import Transport

__all__ = ["LocalTransport"]


class LocalTransport(Transport):
    needs_thread = False

    def __init__(self, device: Any = "cpu") -> None:
        super().__init__(device)
        if self.device.type != "cpu":
            raise ValueError(
                f"LocalTransport keeps batches on the CPU, got device={self.device}; use "
                "transport='auto' or 'cuda' for a CUDA device"
            )
