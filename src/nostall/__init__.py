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
    from .containers._flat import NumberArray, ObjectArray, Records, StringArray, flat
    from .core._device import DeviceLoader, to_device
    from .core._distributed import ShardInfo, shard_info
    from .core._loader import DataLoader
    from .core._loader_config import LoaderConfig
    from .workers._seeding import WorkerRNG, worker_rng
    from .observe._stats import EpochStats, LoaderStats
    from .observe._watch import Watched, progress, watch

# Public name -> the private module defining it.
_WHERE = {
    "DataLoader": "core._loader",
    "DeviceLoader": "core._device",
    "EpochStats": "observe._stats",
    "LoaderConfig": "core._loader_config",
    "LoaderStats": "observe._stats",
    "NumberArray": "containers._flat",
    "ObjectArray": "containers._flat",
    "Records": "containers._flat",
    "ShardInfo": "core._distributed",
    "StringArray": "containers._flat",
    "Watched": "observe._watch",
    "WorkerRNG": "workers._seeding",
    "flat": "containers._flat",
    "progress": "observe._watch",
    "shard_info": "core._distributed",
    "to_device": "core._device",
    "watch": "observe._watch",
    "worker_rng": "workers._seeding",
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
