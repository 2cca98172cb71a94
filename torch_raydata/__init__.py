"""torch_raydata: the last mile from a Ray Dataset to PyTorch batches on the device.

    import torch_raydata as trd
    ds = trd.RayIterableDataset(ray_dataset, batch_size=256)
    for batch in torch.utils.data.DataLoader(ds, batch_size=None): ...

See shared/DESIGN.md (six stages) and README.md.
"""

from . import callbacks, collate, pipeline, transports
from .dataset import RayIterableDataset
from .pipeline.stats import LoaderStats
from .pipeline.threaded import iter_threaded

__all__ = [
    "RayIterableDataset",
    "LoaderStats",
    "iter_threaded",
    "callbacks",
    "collate",
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
