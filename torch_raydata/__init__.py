"""torch_raydata: the last mile from a Ray Dataset to PyTorch batches on the device.

    import torch_raydata as trd
    ds = trd.RayIterableDataset(ray_dataset, batch_size=256)
    for batch in ds.loader(): ...          # DataLoader(ds, batch_size=None)

    for batch in trd.iter_torch_batches(ray_dataset, batch_size=256): ...   # Ray's keywords

See docs/architecture.md (the six stages, the layers) and README.md. Layers, imports
pointing down only: ``dataset``, ``drop_in`` (``iter_torch_batches``), ``lightning``,
``callbacks`` (what users call; ``guards`` holds the dataset's misuse checks) ->
``distributed`` -> ``pipeline`` -> ``resume``, ``transports``, ``collate`` -> ``kernels``,
``memory``, ``_checks`` (option validation).
"""

from . import callbacks, collate, distributed, pipeline, resume, transports
from .dataset import RayIterableDataset
from .drop_in import TorchBatches, iter_torch_batches
from .pipeline.stats import LoaderStats
from .pipeline.threaded import iter_threaded

__all__ = [
    "RayIterableDataset",
    "iter_torch_batches",
    "TorchBatches",
    "LoaderStats",
    "iter_threaded",
    "callbacks",
    "collate",
    "distributed",
    "resume",
    "transports",
    "pipeline",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: Lightning is an extra (pip install 'torch_raydata[lightning]'); importing it
    # costs seconds, and `import torch_raydata` must work without it.
    if name == "RayDataModule":
        from .lightning import RayDataModule

        return RayDataModule
    raise AttributeError(f"module 'torch_raydata' has no attribute {name!r}")


def __dir__() -> list[str]:
    # RayDataModule is lazy (above) but part of the API: list it (not in __all__, so that
    # `from torch_raydata import *` works without Lightning).
    return sorted({*globals(), "RayDataModule"})
