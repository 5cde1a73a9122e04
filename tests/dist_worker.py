"""One rank of the torchrun test (tests/test_distributed.py): what each loader gave this rank.

Run as ``python -m torch.distributed.run --nproc_per_node=2 ... tests/dist_worker.py
--out DIR``; each rank writes ``DIR/rank<R>.json`` with the sample indices of every
batch of every epoch, per case:

* ``nostall``: ``nostall.DataLoader(shuffle=True, num_workers=2)``, no sampler
  given: nostall shards automatically;
* ``torch``: torch's DataLoader with an explicit ``DistributedSampler`` and
  ``set_epoch`` each epoch (what nostall must equal);
* ``nostall_explicit``: nostall with the user's own ``DistributedSampler`` (kept as is);
* ``iterable`` / ``iterable_small``: an IterableDataset sharded with
  ``nostall.shard_info`` over ranks x workers (``iterable_small`` has fewer
  samples than shards: one worker gets none and warns);
* ``resume`` (only when ``nostall.DataLoader`` has ``state_dict``): the state
  saved after ``RESUME_AT`` batches of epoch 1, and the one saved between epochs
  0 and 1, each restored into a new loader.
"""

from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist
import torch.utils.data as tud
from toy_datasets import Indexed  # this script's directory, tests/, is on sys.path

import nostall
from nostall.core import _distributed
from nostall.observe import _cpus

RESUME_AT = 5


class ShardedRange(tud.IterableDataset):
    """Yields 0..n-1, each copy (rank x worker) only its own ``nostall.shard_info`` part."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        index, count = nostall.shard_info(length=self.n)
        return iter(range(index, self.n, count))


def _epochs(loader, epochs: int) -> list:
    return [[batch.tolist() for batch in loader] for _ in range(epochs)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=101)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    info = _distributed.rank_info()
    dataset = Indexed(args.samples)
    kw = dict(batch_size=args.batch, num_workers=2)
    result: dict = {
        "rank": info.rank,
        "world_size": info.world_size,
        "local_world_size": info.local_world_size,
        "cpu_budget": _cpus.local_cpu_budget(),
        "usable_cpus": float(_cpus.usable_cpus().count),
    }

    with nostall.DataLoader(dataset, shuffle=True, **kw) as loader:
        result["sampler"] = type(loader.sampler).__name__
        result["len"] = len(loader)
        result["nostall"] = _epochs(loader, args.epochs)
        result["stats_batches"] = loader.stats.batches

    sampler = tud.DistributedSampler(dataset, shuffle=True)
    loader = tud.DataLoader(dataset, sampler=sampler, **kw)
    result["torch"] = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        result["torch"].append([batch.tolist() for batch in loader])

    own = tud.DistributedSampler(dataset, shuffle=True)
    with nostall.DataLoader(dataset, sampler=own, **kw) as loader:
        result["nostall_explicit_kept"] = loader.sampler is own
        result["nostall_explicit"] = []
        for epoch in range(args.epochs):
            own.set_epoch(epoch)
            result["nostall_explicit"].append([batch.tolist() for batch in loader])

    with nostall.DataLoader(ShardedRange(args.samples), **kw) as loader:
        result["iterable"] = _epochs(loader, args.epochs)
    with nostall.DataLoader(ShardedRange(3), **kw) as loader:
        result["iterable_small"] = _epochs(loader, 1)

    if hasattr(nostall.DataLoader, "state_dict"):
        with nostall.DataLoader(dataset, shuffle=True, **kw) as loader:
            _epochs(loader, 1)
            between = loader.state_dict()
            it = iter(loader)
            head = [next(it).tolist() for _ in range(RESUME_AT)]
            state = loader.state_dict()
        with nostall.DataLoader(dataset, shuffle=True, **kw) as fresh:
            fresh.load_state_dict(state)
            tail = [batch.tolist() for batch in fresh]
        with nostall.DataLoader(dataset, shuffle=True, **kw) as fresh:
            fresh.load_state_dict(between)
            next_epoch = [batch.tolist() for batch in fresh]
        result["resume"] = {"at": RESUME_AT, "head": head, "tail": tail, "next_epoch": next_epoch}

    with open(os.path.join(args.out, f"rank{info.rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
