"""One rank of the torchrun + Ray test (tests/test_ray.py): what this rank's Ray-made batches were.

Run as ``python -m torch.distributed.run --nproc_per_node=2 ... tests/ray_dist_worker.py
--out DIR --address RAY_ADDRESS``; each rank joins the test's Ray cluster, loads with
``worker_type="ray"`` (its own actor) and with torch's DataLoader plus a
``DistributedSampler`` (what nostall must equal), and writes ``DIR/rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import ray
import torch.distributed as dist
import torch.utils.data as tud
from toy_datasets import Indexed  # this script's directory, tests/, is on sys.path

import nostall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--samples", type=int, default=41)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    paths = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    ray.init(address=args.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": paths}})
    dataset = Indexed(args.samples)
    result: dict = {"rank": rank}
    with nostall.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=1, worker_type="ray") as loader:
        result["nostall"] = [[b.tolist() for b in loader] for _ in range(2)]
        result["actor_pids"] = sorted(loader._engine.pool.wait_started().values())
    sampler = tud.DistributedSampler(dataset, shuffle=True)
    torch_loader = tud.DataLoader(dataset, batch_size=4, sampler=sampler)
    result["torch"] = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        result["torch"].append([b.tolist() for b in torch_loader])
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    ray.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
