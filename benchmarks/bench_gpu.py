#!/usr/bin/env python
"""The hand-off to the GPU: how long the training loop waits per batch.

Question
    On a 30 MB batch (32 x 3 x 256 x 320 float32), how long does the loop wait
    per batch with torch's usual recipe (``pin_memory=True``, then
    ``batch.to(device, non_blocking=True)`` in the loop) against
    ``nostall.to_device(nostall.DataLoader(..., pin_memory=True), device)``, which
    copies the next batches on a side stream while the step runs?

Command (a machine with a CUDA device)
    .venv/bin/python benchmarks/bench_gpu.py --out bench-results/bench_gpu.json

Method
    A dataset returning random float32 images (made once, copied per sample), 2
    workers, 60 batches after 5 warm-up batches; the step is a matmul sized to take
    about ``--step-ms`` on the GPU. The loop's wait is the time from the end of one
    step to the moment the next batch is usable on the device (``torch.cuda.synchronize``
    brackets the step so only the hand-off is counted). Median and p99 per batch.

Output
    A markdown table on stdout and the figures as JSON in ``--out``. Without CUDA
    the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import nostall


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n
        self.image = torch.rand(3, 256, 320)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.image.clone()


def run(label: str, batches, device, step, warmup: int, count: int, move: bool) -> dict:
    waits = []
    it = iter(batches)
    for k in range(warmup + count):
        started = time.perf_counter()
        batch = next(it)
        if move:
            batch = batch.to(device, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()  # the batch is usable now
        if k >= warmup:
            waits.append(time.perf_counter() - started)
        step(batch)
        torch.cuda.synchronize(device)
    waits.sort()
    return {"loader": label, "wait_p50_ms": 1e3 * statistics.median(waits),
            "wait_p99_ms": 1e3 * waits[min(len(waits) - 1, int(0.99 * len(waits)))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--step-ms", type=float, default=30.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device; torch.cuda.is_available() is False here.")
        return 2
    device = torch.device(args.device)
    weight = torch.rand(4096, 4096, device=device)
    reps = max(1, round(args.step_ms / 3))

    def step(batch):
        for _ in range(reps):
            weight @ weight  # noqa: B018  (GPU work standing in for a training step)

    warmup, count = 5, 60
    n = (warmup + count) * 32
    kw = dict(batch_size=32, num_workers=2, pin_memory=True)
    rows = [
        run("torch pin_memory + .to(non_blocking) in the loop",
            torch.utils.data.DataLoader(Images(n), persistent_workers=True, **kw), device, step, warmup, count, True),
        run("nostall.to_device(prefetch=2)",
            nostall.to_device(nostall.DataLoader(Images(n), **kw), device, prefetch=2), device, step, warmup, count,
            False),
    ]
    print("| loader | wait per batch p50 (ms) | p99 (ms) |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['loader']} | {r['wait_p50_ms']:.2f} | {r['wait_p99_ms']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
