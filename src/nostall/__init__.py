"""nostall: PyTorch input pipelines without pauses between epochs.

``nostall.DataLoader`` takes ``torch.utils.data.DataLoader``'s arguments and returns
the same batches; its workers persist and prepare the next epoch while the current
one finishes.

The public names are imported when first used (PEP 562), so ``import nostall``
alone does not import torch: the ``nostall`` command starts at once, and a
subcommand imports torch only when it needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports them
    from ._containers import NumberArray, ObjectArray, Records, StringArray, flat
    from ._device import DeviceLoader, to_device
    from ._distributed import ShardInfo, shard_info
    from ._loader import DataLoader
    from ._loader_config import LoaderConfig
    from ._seeding import WorkerRNG, worker_rng
    from ._stats import EpochStats, LoaderStats
    from ._watch import Watched, progress, watch

# Public name -> the private module defining it.
_WHERE = {
    "DataLoader": "_loader",
    "DeviceLoader": "_device",
    "EpochStats": "_stats",
    "LoaderConfig": "_loader_config",
    "LoaderStats": "_stats",
    "NumberArray": "_containers",
    "ObjectArray": "_containers",
    "Records": "_containers",
    "ShardInfo": "_distributed",
    "StringArray": "_containers",
    "Watched": "_watch",
    "WorkerRNG": "_seeding",
    "flat": "_containers",
    "progress": "_watch",
    "shard_info": "_distributed",
    "to_device": "_device",
    "watch": "_watch",
    "worker_rng": "_seeding",
}

# Submodules reachable as attributes (``nostall.lightning``); not in __all__: each
# imports a framework.
_SUBMODULES = {"lightning"}

__all__ = sorted(_WHERE, key=lambda name: (name[0].islower(), name))
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import a public name's module on first use and keep the name here."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'nostall' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later uses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
