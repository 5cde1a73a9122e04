"""A loader's process forked while the loader runs (os.fork()), run as a script by
tests/test_fork_safety.py so that children exit for real (atexit handlers, finalizers,
multiprocessing's exit handler), as they do in user programs.

    python fork_scenarios.py SCENARIO WORKER_TYPE START_METHOD

SCENARIO: ``iterate`` (the child tries the parent's loader: iter(), next() on the
parent's iterator, worker_pids(); then exits) or ``exit`` (ten children, each leaves
the loader alive, deletes it, or closes it, then exits). The parent takes one batch
between forks, finishes the epoch and one more, and prints one JSON line: its batches,
torch's batches for the same generator seed, the children's reports, its worker pids
before and after, and the restarts nostall recorded.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

import torch
import torch.utils.data

import nostall

N, BATCH, WORKERS, SEED = 64, 4, 2, 1234


class Squares(torch.utils.data.Dataset):
    """Sample i is [i, i*i]: batches name their indices."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return torch.tensor([i, i * i])


def _batches(loader_cls, epochs: int, **kw) -> list:
    loader = loader_cls(Squares(), batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                        generator=torch.Generator().manual_seed(SEED), **kw)
    out = [[b[:, 0].tolist() for b in loader] for _ in range(epochs)]
    if hasattr(loader, "close"):
        loader.close()
    return out


def _child(action: str, loader, it, report_w: int) -> None:
    """Runs in the forked child; reports one JSON line on ``report_w``."""
    report: dict = {"action": action, "errors": {}}
    if action == "iterate":
        for what, call in (("next", lambda: next(it)), ("iter", lambda: iter(loader)),
                           ("worker_pids", loader.worker_pids)):
            try:
                call()
                report["errors"][what] = None
            except RuntimeError as exc:
                report["errors"][what] = str(exc)
        report["len"] = len(loader)
        # A loader made in the child works: the dataset can be passed on.
        own = nostall.DataLoader(loader.dataset, batch_size=BATCH, num_workers=1,
                                 worker_type=loader.worker_type, multiprocessing_context=loader.multiprocessing_context)
        report["own"] = [b[:, 0].tolist() for b in own][:2]
        own.close()
    elif action == "delete":
        del it, loader
        gc.collect()
    elif action == "close":
        loader.close()
    os.write(report_w, (json.dumps(report) + "\n").encode())
    os.close(report_w)


def main(scenario: str, worker_type: str, method: str) -> None:
    ctx = torch.multiprocessing.get_context(method)
    loader = nostall.DataLoader(Squares(), batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                generator=torch.Generator().manual_seed(SEED), worker_type=worker_type,
                                multiprocessing_context=ctx)
    it = iter(loader)
    got = [next(it)[:, 0].tolist()]
    pids_before = loader.worker_pids()
    actions = ["iterate"] if scenario == "iterate" else ["alive", "delete", "close"] * 3 + ["alive"]
    children = []
    for action in actions:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _child(action, loader, it, w)
            except BaseException:
                traceback.print_exc()
                os._exit(3)
            sys.exit(0)  # a real exit: atexit handlers and finalizers run, as in user programs
        os.close(w)
        with os.fdopen(r) as fh:
            line = fh.read()
        _, status = os.waitpid(pid, 0)
        children.append({"report": json.loads(line) if line else None, "status": os.waitstatus_to_exitcode(status)})
        got.append(next(it)[:, 0].tolist())  # the parent goes on after every child
    got += [b[:, 0].tolist() for b in it]
    epochs = [got, [b[:, 0].tolist() for b in loader]]
    pids_after = loader.worker_pids()
    restarts = list(loader._engine.supervisor.restarts)
    loader.close()
    print(json.dumps({
        "nostall": epochs, "torch": _batches(torch.utils.data.DataLoader, 2, multiprocessing_context=ctx),
        "children": children, "pids_before": pids_before, "pids_after": pids_after, "restarts": restarts,
    }), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
