"""torch.distributed: each rank loads its own shard; the CPUs are shared among ranks.

Map-style datasets
------------------
When a process group is initialized with more than one rank and the loader is
given neither ``sampler`` nor ``batch_sampler``, nostall uses
``torch.utils.data.DistributedSampler(dataset, shuffle=shuffle,
drop_last=drop_last, seed=...)``, exactly what torch users write by hand:
every rank gets ``ceil(len / world_size)`` samples (the last ones repeated from
the start) or ``floor(len / world_size)`` with ``drop_last=True``, reshuffled
each epoch. The seed is ``generator.initial_seed()`` when a generator is given
(it draws nothing from it), else 0; every rank must use the same seed, so seed
each rank's generator alike.

A user cannot call ``set_epoch`` on a sampler they never see, so nostall does it
at each ``iter(loader)`` (:func:`advance_epoch`): the sampler's epoch is the
loader's epoch number (0, 1, 2, ...; restored by ``load_state_dict``), unless
``set_epoch`` was called since the last ``iter()`` (your own loop, Lightning's
fit loop): then that value is kept. The planner predicts the growth by one, so
the next epoch is still prepared while the current one finishes.

Any ``sampler`` or ``batch_sampler`` you pass is used as given: pass your own
``DistributedSampler`` (and call its ``set_epoch``) to control it, or any other
sampler (e.g. ``SequentialSampler(dataset)``) to give every rank the whole dataset.

Iterable datasets
-----------------
Each worker of each rank iterates its own copy of an ``IterableDataset``, as in
torch; only the dataset can skip what other copies yield. :func:`shard_info`
numbers the copies over ranks x workers::

    class Lines(torch.utils.data.IterableDataset):
        def __iter__(self):
            index, count = nostall.shard_info(length=len(self.items))
            yield from self.items[index::count]

so every sample is yielded exactly once per epoch over all ranks and workers.
With ``length``, a copy that gets nothing warns (once per process).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch
import torch.utils.data as tud

from ..observe._cpus import local_world_size

_empty_warned = False


class RankInfo(NamedTuple):
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_world_size: int  # ranks on this machine


class ShardInfo(NamedTuple):
    """Which of ``count`` disjoint shards of an iterable dataset this copy yields."""

    index: int
    count: int


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def rank_info() -> RankInfo | None:
    """(rank, world_size, local_world_size), or None without an initialized process group."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    return RankInfo(dist.get_rank(), dist.get_world_size(), local_world_size())


def shard_sampler(
    dataset,
    *,
    sampler=None,
    batch_sampler=None,
    shuffle=None,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> tud.DistributedSampler | None:
    """The sampler giving this rank its shard, or None to keep torch's default.

    Takes the loader's own arguments. None when there is no process group, a
    single rank, an ``IterableDataset``, or a ``sampler`` / ``batch_sampler``
    given by the user (theirs is kept).
    """
    if sampler is not None or batch_sampler is not None or isinstance(dataset, tud.IterableDataset):
        return None
    info = rank_info()
    if info is None or info.world_size <= 1:
        return None  # one rank's shard is the whole dataset: torch's own sampler gives torch's batches
    try:
        len(dataset)
    except TypeError:
        raise TypeError(
            f"`dataset` ({type(dataset).__name__}) has no len(), so nostall cannot split it among the "
            f"{info.world_size} ranks. Give it __len__, or pass a `sampler` (e.g. your own "
            "torch.utils.data.DistributedSampler) to choose each rank's samples yourself."
        ) from None
    # initial_seed() draws nothing, so the generator still yields torch's base seed.
    # DistributedSampler seeds with seed + epoch: keep headroom below 2**64.
    # Anything but a torch.Generator is refused at iter(), with torch's error (see _loader).
    seed = generator.initial_seed() & (2**63 - 1) if isinstance(generator, torch.Generator) else 0
    return tud.DistributedSampler(
        dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=bool(shuffle),
        seed=seed,
        drop_last=bool(drop_last),
    )


def advance_epoch(sampler, epoch: int, last: int | None = None) -> int | None:
    """Set the epoch of nostall's own sampler at ``iter(loader)``; returns the next ``last``.

    ``epoch`` is the number of the epoch about to begin (nostall's count, which a
    resumed loader restores). ``last`` is what this function returned at the
    previous ``iter()``, or the sampler's epoch when nostall last set it (0 for a
    new sampler); None sets ``epoch`` unconditionally. When the sampler's epoch is
    no longer ``last``, someone called ``set_epoch`` since (your loop, Lightning's
    fit loop): their value is kept. (Calling ``set_epoch(last)`` again cannot be
    told apart from not calling it.) Call it before the epoch is planned, so the
    planner sees the new epoch.
    """
    set_epoch = getattr(sampler, "set_epoch", None)
    current = getattr(sampler, "epoch", None)
    if set_epoch is None or type(current) is not int:
        return None
    if last is not None and current != last:
        return current
    if current != epoch:
        set_epoch(epoch)
    return epoch


def iterable_shard(rank: int, world_size: int, worker_id: int, num_workers: int) -> ShardInfo:
    """Shard ``rank * num_workers + worker_id`` of ``world_size * num_workers``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"`rank` must be in [0, world_size) with world_size >= 1; got rank={rank}, "
            f"world_size={world_size}."
        )
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise ValueError(
            f"`worker_id` must be in [0, num_workers) with num_workers >= 1; got worker_id={worker_id}, "
            f"num_workers={num_workers} (use worker_id=0, num_workers=1 when loading in the main process)."
        )
    return ShardInfo(rank * num_workers + worker_id, world_size * num_workers)


def _rank_and_world() -> tuple[int, int]:
    info = rank_info()
    if info is not None:
        return info.rank, info.world_size
    # Workers started by spawn or forkserver have no process group, but they
    # inherit the environment torchrun (or accelerate launch) sets for each rank.
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None and world >= 1 and 0 <= rank < world:
        return rank, world
    return 0, 1


def shard_info(length: int | None = None) -> ShardInfo:
    """(index, count): the shard of an iterable dataset that this copy should yield.

    Call it inside ``IterableDataset.__iter__``. Shards are numbered over ranks x
    workers (``rank * num_workers + worker_id``); the rank comes from the
    initialized process group, else from the ``RANK`` / ``WORLD_SIZE``
    environment variables torchrun sets, else it is 0 of 1. In the main process
    (``num_workers=0``) the worker is 0 of 1. Give ``length`` (samples in the
    dataset) to be warned, once per process, when this shard is empty.
    """
    rank, world = _rank_and_world()
    worker = tud.get_worker_info()
    worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
    shard = iterable_shard(rank, world, worker_id, num_workers)
    if length is not None and shard.index >= length:
        _warn_empty(shard, length, rank, world, worker_id, num_workers)
    return shard


def _warn_empty(shard: ShardInfo, length: int, rank: int, world: int, worker_id: int, num_workers: int) -> None:
    global _empty_warned
    if _empty_warned:
        return
    _empty_warned = True
    warnings.warn(
        f"nostall: shard {shard.index} of {shard.count} (rank {rank} of {world}, worker {worker_id} of "
        f"{num_workers}) is empty: the dataset has {length} samples for {shard.count} shards "
        f"({world} ranks x {num_workers} workers). This worker yields nothing; use at most "
        f"{max(1, length // world)} workers per rank.",
        stacklevel=3,
    )

