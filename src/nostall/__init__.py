"""nostall: PyTorch input pipelines without pauses between epochs.

``nostall.DataLoader`` takes ``torch.utils.data.DataLoader``'s arguments and returns
the same batches; its workers persist and prepare the next epoch while the current
one finishes.
"""

from ._loader import DataLoader
from ._seeding import WorkerRNG, worker_rng

__all__ = ["DataLoader", "WorkerRNG", "worker_rng"]
__version__ = "0.1.0"
