#!/usr/bin/env python
"""Where the CPU goes on tiny samples: is nostall's 2-worker figure the machine's ceiling?

Question
    On TinySamples (about 10 us per sample, batch 256), with 2 workers on a
    2-core machine, how busy are the workers and how much CPU does the loader's
    own process use? If both cores are full, no loader can deliver more.

Command
    .venv/bin/python benchmarks/tiny_cpu.py

Method
    One nostall loader (2 workers, fork), one warm-up epoch, then 3 epochs
    timed; the CPU time of each worker process and of this process comes from
    psutil; the cost of one batch made alone (no contention) is timed in this
    process for comparison.
"""

from __future__ import annotations

import time

import psutil
from torch.utils.data._utils.collate import default_collate

import nostall
from nostall.cli._workloads import TinySamples


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> None:
    dataset = TinySamples(100_000)
    with nostall.DataLoader(dataset, batch_size=256, num_workers=2, multiprocessing_context="fork") as loader:
        for _ in loader:  # warm-up epoch: workers started, caches warm
            pass
        workers = [psutil.Process(pid) for pid in loader.worker_pids()]
        me = psutil.Process()
        before = [cpu_seconds(p) for p in workers], cpu_seconds(me)
        started = time.perf_counter()
        batches = 0
        for _ in range(3):
            for _batch in loader:
                batches += 1
        wall = time.perf_counter() - started
        after = [cpu_seconds(p) for p in workers], cpu_seconds(me)
    used = [b - a for a, b in zip(before[0], after[0])]
    main_cpu = after[1] - before[1]
    started = time.perf_counter()
    for i in range(100):
        default_collate([dataset[j] for j in range(i * 256, i * 256 + 256)])
    alone_ms = (time.perf_counter() - started) / 100 * 1e3
    print(f"{batches * 256 / wall:,.0f} samples/s over {wall:.2f} s ({batches} batches)")
    for w, cpu in enumerate(used):
        print(f"worker {w}: {cpu:.2f} s of CPU, {cpu / wall:.0%} busy")
    print(f"loader process: {main_cpu:.2f} s of CPU ({main_cpu / wall:.0%} of one core)")
    print(f"CPU per batch in the workers: {sum(used) / batches * 1e3:.2f} ms; "
          f"the same batch made alone: {alone_ms:.2f} ms")
    print(f"cores in use: {(sum(used) + main_cpu) / wall:.2f} of {len(psutil.Process().cpu_affinity())}")


if __name__ == "__main__":
    main()
