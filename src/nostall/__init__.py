"""nostall: PyTorch input pipelines without pauses between epochs.

``nostall.DataLoader`` takes ``torch.utils.data.DataLoader``'s arguments and returns
the same batches; its workers persist and prepare the next epoch while the current
one finishes.
"""

from ._containers import NumberArray, ObjectArray, Records, StringArray, flat
from ._distributed import ShardInfo, shard_info
from ._loader import DataLoader
from ._loader_config import LoaderConfig
from ._seeding import WorkerRNG, worker_rng
from ._stats import EpochStats, LoaderStats
from ._watch import Watched, progress, watch

__all__ = [
    "DataLoader",
    "EpochStats",
    "LoaderConfig",
    "LoaderStats",
    "NumberArray",
    "ObjectArray",
    "Records",
    "ShardInfo",
    "StringArray",
    "Watched",
    "WorkerRNG",
    "flat",
    "progress",
    "shard_info",
    "watch",
    "worker_rng",
]
__version__ = "0.1.0"
