"""Memory: recycled host buffers for collate output (``BufferPool`` and its ``Lease``) and
pinned staging buffers for host-to-device copies (``PinnedPool``).

Owns allocation and recycling of host memory. Does not own the copies or streams
(``transports/cuda.py``) nor NIXL's registered buffers (the NIXL transport).
"""

from .buffers import BufferPool, Lease
from .pinned import PinnedPool

__all__ = ["BufferPool", "Lease", "PinnedPool"]
