"""torch_raydata: the last mile from a Ray Dataset to PyTorch batches on the device.

    import torch_raydata as trd
    ds = trd.RayIterableDataset(ray_dataset, batch_size=256)
    for batch in torch.utils.data.DataLoader(ds, batch_size=None): ...

See shared/DESIGN.md (six stages) and README.md.
"""

from . import collate, pipeline, transports
from .dataset import RayIterableDataset
from .pipeline.stats import LoaderStats
from .pipeline.threaded import iter_threaded

__all__ = [
    "RayIterableDataset",
    "LoaderStats",
    "iter_threaded",
    "collate",
    "transports",
    "pipeline",
]

__version__ = "0.1.0"
