"""The shm transport: collate in Ray actors on the trainer's node, into shared memory the
trainer maps (no copy in the trainer, no collate on its threads).

    worker.py     ShmCollateWorker: the body of one collate actor (memfd slabs)
    transport.py  ShmTransport: the trainer's end (maps the slabs, hands out views)

The remote epoch, its plans and the actor sets are the NIXL transport's
(``transports/nixl``: ``epoch.py``, ``plan.py``, ``actors.py``); only the memory differs.
"""

from .transport import ShmMapError, ShmTransport

__all__ = ["ShmTransport", "ShmMapError"]
