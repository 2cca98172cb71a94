"""The NIXL transport: collate in Ray actors next to the data, one-sided READs into the trainer.

One responsibility per module:

    transport.py  NixlTransport: the trainer's NIXL agent, READs posted and waited on
    pool.py       DestPool: the trainer's registered destination buffers
    actors.py     CollateActors: the collate actors, started once, kept across epochs,
                  killed with the transport (close or garbage collection)
    worker.py     CollateWorker: the body of one collate actor (agent, source slabs)
    common.py     what both ends share: the nixl import, the RemoteBatch descriptor,
                  the payload codec
    plan.py       stage 3 on metadata: BatchPlan, plan_batches, kept_rows
    epoch.py      RemoteEpochRun: one epoch with collate in the actors, picked by the
                  dataset through ``pipeline.transport.RemoteCollate``
    threads.py    the epoch's plan and fetch threads and what they share
"""

from .transport import NixlTransferError, NixlTransport

__all__ = ["NixlTransport", "NixlTransferError"]
