"""Memory: recycled host buffers for collate output (``BufferPool`` and its ``Lease``).

Owns allocation and recycling of host memory. Does not own pinned staging for CUDA
(``transports.cuda.PinnedPool``) nor NIXL's registered buffers (the NIXL transport).
"""

from .buffers import BufferPool, Lease

__all__ = ["BufferPool", "Lease"]
