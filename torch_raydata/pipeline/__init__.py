"""The six stages, one module each, numbered as in the design (docs/architecture.md):

    1 source    source.py    Dataset / DataIterator / split shard -> block refs (Ray internals)
    2 prefetch  prefetch.py  background threads, byte-bounded window, batched wait + get
    3 batching  batching.py  blocks -> Batch(idx, table, ids): slices, shuffle, drop_last
    4 collate   threaded.py  iter_threaded: N threads, shared input, bounded in-flight
    5 reorder   reorder.py   only with preserve_order=True: restore idx order
    6 finalize  finalize.py  one thread (or inline); a Transport moves batches to the device

Around them, per epoch:

    run.py        EpochRun: stages 2-6 wired together, every thread closed on end/break/error
    consumer.py   EpochConsumer: the training step's side (waits, rows, IDs, max_batches)
    prestart.py   NextEpoch: the next epoch's stream, started before this one ends

and what stages share: stats.py (counters, LoaderStats), queues.py, errors.py,
constants.py, types.py, progress_bar.py.
"""

from .batching import blocks_to_batches
from .finalize import Finalizer
from .prefetch import Fetcher, Prefetcher
from .reorder import restore_order
from .stats import LoaderStats, StatsRecorder
from .threaded import ThreadedIterator, iter_threaded
from .types import Batch, SourceBlock

__all__ = [
    "SourceBlock",
    "Batch",
    "Fetcher",
    "Prefetcher",
    "blocks_to_batches",
    "iter_threaded",
    "ThreadedIterator",
    "restore_order",
    "Finalizer",
    "LoaderStats",
    "StatsRecorder",
]
