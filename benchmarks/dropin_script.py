"""A training script as users write them, in two layouts; run by ``bench_dropin.py``.

``NOSTALL_BENCH_LAYOUT=top``: torch, nostall and the dataset module are imported at
the top of the script, so a spawned worker (or nostall's factory) imports them while
it re-imports the main script. ``inside`` (the default): every import is inside
``main()``, as in CLIs and Hydra apps, so a spawned process re-imports a script that
imports nothing and gets torch and the dataset module only when it unpickles the
dataset. Both run the same loop: ``nostall.cli._measure.measure``.

    python benchmarks/dropin_script.py '{"loader": "nostall", "dataset": "png", "size": 1280,
        "num_workers": 8, "start_method": "spawn", "epochs": 3, "batch_size": 32}'

prints one JSON line: the run's figures, plus the CPU seconds of this process and of
its descendants (the workers) counted until the loader is closed.
"""

import json
import os
import sys

if os.environ.get("NOSTALL_BENCH_LAYOUT") == "top":
    import dropin_datasets  # noqa: F401
    import torch  # noqa: F401

    import nostall  # noqa: F401
    from nostall.cli import _measure  # noqa: F401


def _descendants(pid: int) -> list:
    """Pids of every descendant of ``pid`` (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Tracked:
    """The loader, with the process tree's CPU time taken just before it is closed."""

    def __init__(self, loader, close_loader) -> None:
        self.loader, self._close_loader = loader, close_loader
        self.cpu = None

    def __iter__(self):
        return iter(self.loader)

    def close(self) -> None:
        kids = _descendants(os.getpid())
        self.cpu = {"main_cpu_s": _cpu_s(os.getpid()), "workers_cpu_s": sum(_cpu_s(k) for k in kids),
                    "processes": len(kids)}
        self._close_loader(self.loader)


def main() -> None:
    import dropin_datasets
    import torch

    import nostall
    from nostall.cli import _measure

    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    dataset = dropin_datasets.build(spec["dataset"], spec["size"])
    cls = nostall.DataLoader if spec["loader"] == "nostall" else torch.utils.data.DataLoader
    kwargs = {"batch_size": spec.get("batch_size", 32), "shuffle": True, "num_workers": spec["num_workers"]}
    if spec["num_workers"]:
        kwargs.update(multiprocessing_context=spec["start_method"], persistent_workers=True)
    tracked = []

    def factory():
        generator = torch.Generator()
        generator.manual_seed(0)
        tracked.append(_Tracked(cls(dataset, generator=generator, **kwargs), _measure.close_loader))
        return tracked[-1]

    result = _measure.measure(factory, epochs=spec.get("epochs", 3), step_ms=spec.get("step_ms", 0.0))
    out = result.to_dict()
    out.update(tracked[-1].cpu or {})
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
