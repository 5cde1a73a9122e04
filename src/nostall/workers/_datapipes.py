"""DataPipes as torch's DataLoader treats them: sharded across ranks and workers,
reseeded at every ``iter()``.

torch's loader splits a DataPipe graph at its ``sharding_filter`` into
``world_size * num_workers`` shards (worker ``w`` of rank ``r`` takes shard
``w * world_size + r``; in-process loading shards by rank only), and at every
``iter()`` draws one shared seed (from ``generator``, else the global RNG;
rank 0's under torch.distributed) that seeds the graph's random operations
(``shuffle``) alike in every worker. nostall does the same, so each item comes
once and ``torch.manual_seed(s)`` before ``iter()`` fixes the shuffle, as in torch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import IterDataPipe, MapDataPipe, graph_settings


def is_datapipe(dataset) -> bool:
    """Whether torch's loader would shard ``dataset`` (an Iter- or MapDataPipe)."""
    return isinstance(dataset, (IterDataPipe, MapDataPipe))


def world() -> tuple[int, int]:
    """``(world_size, rank)`` as torch's loader reads them (1, 0 outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shard(dataset, shards: tuple[int, int], num_workers: int, worker_id: int | None) -> None:
    """Keep this worker's share of ``dataset`` (``shards`` from :func:`world`;
    ``worker_id`` None: in-process loading, sharded by rank only)."""
    size, rank = shards
    if worker_id is None:
        graph_settings.apply_sharding(dataset, size, rank)
    else:
        graph_settings.apply_sharding(dataset, num_workers * size, worker_id * size + rank)


def reseed(dataset, seed: int) -> None:
    """Seed the random operations of an IterDataPipe graph for one epoch."""
    graph_settings.apply_random_seed(dataset, torch.Generator().manual_seed(seed))


class SeedSource:
    """Draws the shared seed of each epoch of an IterDataPipe, as torch's iterator does."""

    def __init__(self):
        self._group = None  # a gloo group: the default one may be NCCL, which needs CUDA tensors

    def draw(self, generator: torch.Generator | None) -> int:
        """One int64 from ``generator`` (the global RNG if None), rank 0's under torch.distributed."""
        seed = torch.empty((), dtype=torch.int64).random_(generator=generator)
        if dist.is_available() and dist.is_initialized():
            if self._group is None:
                self._group = dist.new_group(backend="gloo")
            dist.broadcast(seed, src=0, group=self._group)
        return seed.item()
