#!/usr/bin/env python
"""worker_type="ray": the cost of a batch through a Ray actor, and the gain of remote CPUs.

Question
    (1) How long does a large batch take to come back from a Ray actor, compared
        with a local worker process? (2) When batch making needs more CPU than the
        training machine has, does an actor on another CPU (standing in for another
        machine) give the speed-up a local worker on that CPU would?

Command
    PYTHONPATH=src .venv/bin/python benchmarks/bench_ray.py --out bench-results/bench_ray.json

Method
    (1) runs on a one-node Ray cluster (``taskset -c 1 ray start --head
    --num-cpus=1``: the actor on this machine's node, as the question asks). (2)
    runs on a two-node cluster standing in for two machines: the head, where
    training runs, with no CPU for actors (``taskset -c 0 ray start --head
    --num-cpus=0``: its GCS and raylet on CPU 0, as on the training machine), and a
    node lending one CPU (``taskset -c 1 ray start --address=... --num-cpus=1``: its
    raylet, object store and actor processes on CPU 1). This process connects to
    the head. Local worker processes are pinned to CPU 1 in ``worker_init_fn``, so
    both kinds of worker run on the same CPU.

    (1) Transport (with this process on CPU 0, then on any CPU, where it shares
        CPU 1 with the Ray node): a do-nothing dataset whose one sample is a preallocated
        32x480x640 uint8 tensor (9.8 MB), ``batch_size=None``, one worker; the
        loop takes batches and does nothing else. Per batch: the time between two
        consecutive batches reaching the loop (``--transport-batches`` after 10
        warm-up batches), p50 and p99, for one Ray actor and one local process.
    (2) Scale-out stand-in: this process pinned to CPU 0 (``os.sched_setaffinity``),
        a CPU-bound dataset (``--sample-ms`` of CPU per sample, a 3x32x32 float
        sample), batch 32, a training step of 100 ms (``time.sleep``: a GPU step
        leaves the CPU idle). (a) ``num_workers=0`` (samples made on CPU 0 between
        steps), (b) one local worker process on CPU 1, (c) one Ray actor on CPU 1.
        Samples/s over ``--batches`` batches after 2 warm-up batches, the median
        of ``--runs`` runs; a new loader per run (start-up is not timed).

Output
    The figures on stdout and as JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import nostall

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


class Frames(torch.utils.data.Dataset):
    """Every sample is the same preallocated 32x480x640 uint8 batch: nothing to make."""

    def __init__(self, n: int):
        self.n = n
        self.frame = None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.frame is None:
            self.frame = torch.full((32, 480, 640), 7, dtype=torch.uint8)
        return self.frame


class Burn(torch.utils.data.Dataset):
    """Each sample costs ``ms`` milliseconds of CPU (a spin on the thread's CPU clock)."""

    def __init__(self, n: int, ms: float):
        self.n, self.ms = n, ms

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        end = time.thread_time() + self.ms / 1000
        x = 0
        while time.thread_time() < end:
            x += 1
        return torch.full((3, 32, 32), float(i))


def on_cpu_1(worker_id: int) -> None:
    """worker_init_fn: the local worker process runs on CPU 1, where the Ray node is."""
    os.sched_setaffinity(0, {1})


def percentile(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def transport(kind: str, batches: int) -> dict:
    """Seconds between consecutive batches reaching an empty loop (see (1))."""
    kw = dict(worker_type="ray") if kind == "ray" else dict(worker_init_fn=on_cpu_1, multiprocessing_context="fork")
    with nostall.DataLoader(Frames(batches + 10), batch_size=None, num_workers=1, **kw) as loader:
        it = iter(loader)
        for _ in range(10):
            batch = next(it)
        assert batch.shape == (32, 480, 640) and batch.dtype == torch.uint8
        gaps, last = [], time.perf_counter()
        for batch in it:
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    return {"p50_ms": percentile(gaps, 50) * 1e3, "p99_ms": percentile(gaps, 99) * 1e3, "batches": len(gaps)}


def scale_out_run(kind: str, batches: int, sample_ms: float) -> float:
    """Samples per second with a 100 ms training step (see (2))."""
    kw = {"a": dict(num_workers=0),
          "b": dict(num_workers=1, worker_init_fn=on_cpu_1, multiprocessing_context="fork"),
          "c": dict(num_workers=1, worker_type="ray")}[kind]
    with nostall.DataLoader(Burn((batches + 2) * 32, sample_ms), batch_size=32, **kw) as loader:
        it = iter(loader)
        for _ in range(2):
            next(it)
            time.sleep(0.1)
        start, n = time.perf_counter(), 0
        for batch in it:
            n += len(batch)
            time.sleep(0.1)  # the training step
        return n / (time.perf_counter() - start)


def start_cluster(two_nodes: bool, store_bytes: int = 1 << 30) -> str:
    """One node pinned to CPU 1 with one CPU for actors; or (``two_nodes``) a head
    pinned to CPU 0 with none and a one-CPU node pinned to CPU 1. Connects to it."""
    import ray

    ray.shutdown()
    subprocess.run(["ray", "stop", "--force"], capture_output=True, check=False)
    env = {**os.environ, "PYTHONPATH": SRC}
    common = [f"--object-store-memory={store_bytes}", "--disable-usage-stats"]
    head_cpu, head_cpus = ("0", "0") if two_nodes else ("1", "1")
    subprocess.run(["taskset", "-c", head_cpu, "ray", "start", "--head", f"--num-cpus={head_cpus}", "--port=6390",
                    "--include-dashboard=false", *common], env=env, check=True, capture_output=True)
    if two_nodes:
        subprocess.run(["taskset", "-c", "1", "ray", "start", "--address=127.0.0.1:6390", "--num-cpus=1", *common],
                       env=env, check=True, capture_output=True)
    ray.init(address="127.0.0.1:6390", log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": SRC}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--transport-batches", type=int, default=300)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sample-ms", type=float, default=5.0)
    args = parser.parse_args()
    assert os.path.dirname(nostall.__file__).startswith(SRC), nostall.__file__
    import ray

    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        start_cluster(two_nodes=False)
        results: dict = {"cpus": os.cpu_count(), "ray": ray.__version__, "torch": torch.__version__}
        print("(1) a 32x480x640 uint8 batch (9.8 MB) through one worker on CPU 1, empty loop:")
        everywhere = os.sched_getaffinity(0)
        for where in ("CPU 0", "any CPU"):
            os.sched_setaffinity(0, {0} if where == "CPU 0" else everywhere)
            for kind in ("ray", "process"):
                r = results[f"transport_{kind}_loop_on_{where.replace(' ', '_')}"] = transport(kind, args.transport_batches)
                print(f"    loop on {where:7s} {'Ray actor' if kind == 'ray' else 'local process':14s} "
                      f"p50 {r['p50_ms']:6.2f} ms   p99 {r['p99_ms']:6.2f} ms   ({r['batches']} batches)")
        os.sched_setaffinity(0, {0})  # the training process on CPU 0 from here on
        start_cluster(two_nodes=True)
        print(f"(2) {args.sample_ms:g} ms of CPU per sample, batch 32, 100 ms step; this process on CPU 0; "
              f"median of {args.runs} runs of {args.batches} batches:")
        rates: dict = {k: [] for k in "abc"}
        for _ in range(args.runs):
            for kind in "abc":  # interleaved: a slow spell on the machine hits every kind alike
                rates[kind].append(scale_out_run(kind, args.batches, args.sample_ms))
        names = {"a": "(a) num_workers=0", "b": "(b) 1 local process on CPU 1", "c": "(c) 1 Ray actor on CPU 1"}
        med = {k: statistics.median(v) for k, v in rates.items()}
        for kind in "abc":
            print(f"    {names[kind]:32s} {med[kind]:7.1f} samples/s   runs: "
                  + ", ".join(f"{r:.1f}" for r in rates[kind]))
        print(f"    (c)/(a) = {med['c'] / med['a']:.2f}x (target >= 1.6x); "
              f"(c)/(b) = {med['c'] / med['b']:.2f}x (target >= 0.85x)")
        results["scale_out"] = {"runs": rates, "median": med, "c_over_a": med["c"] / med["a"],
                                "c_over_b": med["c"] / med["b"], "sample_ms": args.sample_ms,
                                "batches": args.batches}
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    finally:
        ray.shutdown()
        subprocess.run(["ray", "stop", "--force"], capture_output=True, check=False)


if __name__ == "__main__":
    main()
