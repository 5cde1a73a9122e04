"""Batches made by Ray actors: ``worker_type="ray"`` (README: "More CPUs than one machine has").

Start a cluster first (on the training machine, then on each machine lending CPUs):

    ray start --head --num-cpus=0
    ray start --address=<head-ip>:6379 --num-cpus=<cpus to lend>

then run ``python examples/ray_actors.py --address auto --workers 2``. The dataset
must be importable on every node (here: this file's directory is sent with
``runtime_env``). Every sample costs ~5 ms of CPU, as a decode and augmentation would.
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch

import nostall


class Decoded(torch.utils.data.Dataset):
    """A stand-in for decoding and augmenting an image: ``ms`` of CPU per sample."""

    def __init__(self, n: int, ms: float = 5.0):
        self.n, self.ms = n, ms

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        end = time.thread_time() + self.ms / 1000
        while time.thread_time() < end:
            pass
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 64, 64, generator=g), i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=None, help="the cluster's address ('auto'); default: a local Ray")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(address=args.address, runtime_env={"working_dir": here}, log_to_driver=False)
    with nostall.DataLoader(Decoded(4096), batch_size=32, shuffle=True, num_workers=args.workers,
                            worker_type="ray", ray_actor_options={"num_cpus": 1},
                            generator=torch.Generator().manual_seed(0)) as loader:
        for _ in range(args.epochs):
            for images, indices in loader:
                time.sleep(0.02)  # the training step
        print(loader.stats)


if __name__ == "__main__":
    main()
