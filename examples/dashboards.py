#!/usr/bin/env python
"""nostall's figures in TensorBoard: a training loop whose input pipeline starts too
small, writes ``loader.stats.scalars()`` with ``SummaryWriter.add_scalar`` every few
steps, then plots the event file it wrote (read back with TensorBoard's
EventAccumulator) to a PNG.

    python examples/dashboards.py --logdir runs/dashboards --png docs/dashboards.png
    tensorboard --logdir runs/dashboards        # the same figures, live

The dataset takes ~2 ms a sample; the step ~4 ms. The first loader has one worker
(the loop waits for data), the second ``num_workers="auto"`` (the tuner adds workers).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

import nostall


class SlowSamples(Dataset):
    """Samples that each take ``cost_s`` of CPU to make."""

    def __init__(self, n: int = 2048, cost_s: float = 0.002) -> None:
        self.n, self.cost_s = n, cost_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        end = time.perf_counter() + self.cost_s
        while time.perf_counter() < end:  # busy: a decode or an augmentation
            pass
        return torch.full((8,), float(i)), i


def train(loader, writer, step: int, steps: int, every: int, step_s: float) -> tuple[int, dict]:
    """Run ``steps`` steps of ``step_s`` each, logging the scalars every ``every`` steps;
    returns the step reached and the figures logged last."""
    done, last = 0, {}
    while done < steps:
        for _batch in loader:
            end = time.perf_counter() + step_s
            while time.perf_counter() < end:  # the model's step
                pass
            done += 1
            step += 1
            if done % every == 0:
                last = loader.stats.scalars()
                for name, value in last.items():
                    writer.add_scalar(name, value, step)
            if done >= steps:
                break
    return step, last


def plot(logdir: Path, png: Path) -> None:
    """Plot wait_fraction, samples/s and workers from the event file under ``logdir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    names = ["nostall/wait_fraction", "nostall/samples_per_s", "nostall/workers_busy", "nostall/num_workers"]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 7), sharex=True)
    for ax, name in zip(axes, names):
        events = acc.Scalars(name)
        ax.plot([e.step for e in events], [e.value for e in events], marker=".")
        ax.set_ylabel(name.split("/", 1)[1], fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training step")
    fig.suptitle("loader.stats.scalars() in TensorBoard: 1 worker, then num_workers=\"auto\"", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    print(f"wrote {png}")


def main() -> None:
    """Write the event file, print the last scalars and the tags, plot the PNG."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", default="runs/dashboards")
    p.add_argument("--png", default="docs/dashboards.png")
    p.add_argument("--steps", type=int, default=300, help="steps per loader")
    args = p.parse_args()
    from torch.utils.tensorboard import SummaryWriter

    logdir = Path(args.logdir)
    writer = SummaryWriter(str(logdir))
    dataset = SlowSamples()
    step = 0
    for workers in (1, "auto"):
        with nostall.DataLoader(dataset, batch_size=4, num_workers=workers, shuffle=True) as loader:
            step, last = train(loader, writer, step, args.steps, every=20, step_s=0.004)
            print(f"num_workers={workers!r}, step {step}: print(loader.stats.scalars())")
            print(f"  {last}")
            for name, value in last.items():
                print(f"  {name:24s} {value:10.3f}")
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    print("TensorBoard tags:", ", ".join(sorted(acc.Tags()["scalars"])))
    plot(logdir, Path(args.png))


if __name__ == "__main__":
    main()
