#!/usr/bin/env python
"""Faults: what torch's DataLoader and nostall do when something goes wrong.

Question
    When a worker is SIGKILLed, a sample hangs or raises, the script lacks its
    ``__main__`` guard under spawn, the dataset cannot be pickled, or the user
    presses Ctrl-C: does the loader lose the epoch, hang, or crash, or does it
    complete (with the same batches) or explain what happened and where?

Command
    .venv/bin/python benchmarks/bench_faults.py --out bench-results/bench_faults.json

Method
    Every run is its own program in its own session (this script with the hidden
    ``--child`` option, or a generated script for the ``__main__`` guard case),
    with ``PYTHONPATH`` holding ``src/`` and ``benchmarks/``. A run that outlives
    ``--limit`` seconds is killed with its whole process group and counted as hung;
    every run's leftover processes are killed when it ends. Both loaders get the
    same arguments: a 240-sample dataset (``fault_datasets.Noisy``: 2 ms of sleep
    and 3 random numbers per sample), batch 8, ``num_workers=2``, ``shuffle=True``
    with a seeded generator, ``persistent_workers=True``, fork (spawn where the
    scenario is about spawn), plus what the scenario needs (``timeout``,
    ``hang_timeout``, ``on_sample_error``). Batches are compared by a SHA-256
    digest per epoch with an undisturbed run of the same loader. Runs go one after
    the other (2-core machine). In the kill rows, torch's worker pids come from
    its private ``loader._iterator._workers`` (it has no public way); Ctrl-C is
    SIGINT to the run's process group, and what is left is counted with psutil.

    The soak (nostall only; ``--only soak`` runs it alone, about a minute on 2
    cores): nostall's defaults, 640 samples of 4 floats (``Noisy``, 1 ms each),
    batch 8, 2 workers, 10 epochs, under fork and under spawn. Every 10 batches a
    random live process of the loader's tree (the workers and their parent, the
    worker factory, as ps shows them) is SIGKILLed. Compared with an undisturbed
    run with the same generator: each epoch's digest, every index exactly once per
    epoch; after ``close()``: children and zombies of the run's process, any pid
    the loader ever had still present 5 s later (workers lost with their factory
    are orphans that init reaps), ``/dev/shm/torch_<pid>_*`` and
    ``/tmp/nostall-stack-<pid>*`` files of those pids, and processes left in the
    run's session when it exits.

Output
    A markdown table on stdout (scenario | torch's DataLoader | nostall), the soak
    table (a row per start method), a list of the scenarios where nostall fell
    short of its documented behaviour, and every run's raw facts as JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
N_SAMPLES = 240  # 30 batches of 8 per epoch
BAD = 37  # the index that hangs or raises
HANG_TIMEOUT = 5.0
SCENARIOS = ("kill_once", "kill_every", "hang", "raises", "guard", "pickle", "ctrl_c", "soak")


def one_line(kind: str, text: str, limit: int = 150) -> str:
    """``Type: message`` on one line, at most ``limit`` characters of message."""
    text = " ".join(text.split())
    return f"{kind}: {text if len(text) <= limit else text[:limit - 3] + '...'}"


# --------------------------------------------------------------------------- #
# Child side: one scenario with one loader, facts printed as "FACT {json}" lines
# as they become known (so a run killed for hanging still tells how far it got).
# --------------------------------------------------------------------------- #


def report(**facts) -> None:
    print("FACT " + json.dumps(facts), flush=True)


def error_facts(exc: BaseException, t0: float) -> dict:
    text = str(exc)
    return dict(error=one_line(type(exc).__name__, text), error_type=type(exc).__name__,
                error_text=text[:6000], error_after_s=round(time.perf_counter() - t0, 2), error_at=time.time())


def make_loader(kind: str, dataset, **overrides):
    import torch
    import torch.utils.data as tud

    import nostall

    kw = dict(batch_size=8, num_workers=2, shuffle=True, generator=torch.Generator().manual_seed(0),
              persistent_workers=True, multiprocessing_context="fork")
    kw.update(overrides)
    return (tud.DataLoader if kind == "torch" else nostall.DataLoader)(dataset, **kw)


def worker_pids(kind: str, loader) -> list[int]:
    if kind == "torch":  # torch has no public way; persistent workers keep this iterator
        return [w.pid for w in loader._iterator._workers]
    return loader.worker_pids()


def job_epochs(kind: str, opts: dict) -> None:
    """Run ``epochs`` epochs, digesting each; SIGKILL a worker on the way if asked:
    ``kill={"epoch": E, "after": B}`` once, or ``kill={"every": K}`` about every K
    batches (for nostall only once the previous death was noticed, as the test does)."""
    import fault_datasets

    spec = opts["dataset"]
    dataset = getattr(fault_datasets, spec["cls"])(**spec["args"])
    loader = make_loader(kind, dataset, **opts.get("loader", {}))
    kill = opts.get("kill") or {}
    rng = random.Random(0)
    done: list[dict] = []
    kills = seen = epoch = batches = 0
    due = kill.get("every", 0) - 1
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for epoch in range(opts["epochs"]):
                digest, batches, samples = hashlib.sha256(), 0, 0
                for batch in loader:
                    digest.update(batch.numpy().tobytes())
                    batches, samples, seen = batches + 1, samples + len(batch), seen + 1
                    if kill.get("epoch") == epoch and kill.get("after") == batches and not kills:
                        os.kill(worker_pids(kind, loader)[0], signal.SIGKILL)
                        kills += 1
                    elif "every" in kill and seen >= due and (kind == "torch" or len(loader.stats.restarts) >= kills):
                        os.kill(rng.choice(worker_pids(kind, loader)), signal.SIGKILL)
                        kills, due = kills + 1, seen + kill["every"]
                done.append(dict(digest=digest.hexdigest()[:16], batches=batches, samples=samples))
                report(epochs_done=done, kills=kills)
            report(completed=True, done_after_s=round(time.perf_counter() - t0, 2))
        except Exception as exc:  # noqa: BLE001 - any error is the outcome under test
            report(error_epoch=epoch, error_batches=batches, kills=kills, **error_facts(exc, t0))
        said = [one_line(w.category.__name__, str(w.message), 6000)
                for w in caught if issubclass(w.category, RuntimeWarning)]
        report(warnings=said[:3], warning_count=len(said))  # the first few in full: they repeat
    if kind == "nostall":
        report(restarts=list(loader.stats.restarts),
               skipped=[dict(epoch=s["epoch"], index=s["index"]) for s in loader.stats.skipped])
        loader.close()


def job_pickle(kind: str, opts: dict) -> None:
    """Start workers under spawn with a dataset that holds a lambda."""
    from fault_datasets import WithLambda

    loader = make_loader(kind, WithLambda(64), multiprocessing_context="spawn")
    t0 = time.perf_counter()
    try:
        next(iter(loader))
        report(completed=True)
    except Exception as exc:  # noqa: BLE001 - any error is the outcome under test
        report(**error_facts(exc, t0))
    if kind == "nostall":
        loader.close()


def job_ctrl_c(kind: str, opts: dict) -> None:
    """Iterate epochs of ~100 s each until interrupted; no handler, as in a plain script."""
    from fault_datasets import Noisy

    loader = make_loader(kind, Noisy(100_000))
    for epoch in itertools.count():
        for i, _ in enumerate(loader):
            if epoch == 0 and i == 5:
                report(iterating=True)


def _loader_tree(loader) -> tuple[list[int], list[int]]:
    """The loader's workers, and all its processes as ps shows them: the workers and their
    parent, the factory."""
    import psutil

    workers = loader.worker_pids()
    tree = set(workers)
    for pid in workers:
        try:
            tree.add(psutil.Process(pid).ppid())
        except psutil.NoSuchProcess:
            pass
    tree.discard(os.getpid())
    tree.discard(1)  # a worker orphaned a moment ago
    return workers, sorted(tree)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def job_soak(kind: str, opts: dict) -> None:
    """nostall with its defaults for ``epochs`` epochs; with ``every`` > 0, SIGKILL a random
    process of the loader's tree (a worker or the factory) every ``every`` batches. Reports
    each epoch's digest, whether every index came exactly once, and, after close, what of
    the loader is left: processes, zombies, /dev/shm/torch_<pid>_* and stack-dump files."""
    import collections
    import glob

    import psutil
    import torch

    import nostall
    from fault_datasets import Noisy

    n, every = opts["n"], opts.get("every", 0)
    loader = nostall.DataLoader(Noisy(n, ms=opts.get("ms", 1.0)), batch_size=8, num_workers=2, shuffle=True,
                                generator=torch.Generator().manual_seed(0),
                                multiprocessing_context=opts["method"])
    rng = random.Random(opts.get("seed", 0))
    seen: set = set()
    killed: list = []
    factory_kills = batches = epoch = 0
    digests, once = [], True
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one restart warning per death
        try:
            for epoch in range(opts["epochs"]):
                digest, counts = hashlib.sha256(), collections.Counter()
                for batch in loader:
                    digest.update(batch.numpy().tobytes())
                    counts.update(int(i) for i in batch[:, 0].tolist())
                    batches += 1
                    if every and batches % every == 0:
                        workers, tree = _loader_tree(loader)
                        seen.update(tree)
                        live = [p for p in tree if p not in killed and _running(p)]
                        if live:
                            victim = rng.choice(live)
                            factory_kills += victim not in workers
                            os.kill(victim, signal.SIGKILL)
                            killed.append(victim)
                once &= sorted(counts) == list(range(n)) and set(counts.values()) == {1}
                digests.append(digest.hexdigest()[:16])
            report(completed=True, done_after_s=round(time.perf_counter() - t0, 2))
        except Exception as exc:  # noqa: BLE001 - any error is the outcome under test
            report(error_epoch=epoch, error_batches=batches, **error_facts(exc, t0))
    seen.update(_loader_tree(loader)[1])
    restarts = loader.stats.restarts
    seen.update(int(p) for r in restarts for p in re.findall(r"\(pid (\d+)\)", r))
    loader.close()
    mine = psutil.Process().children(recursive=True)
    children = [p.pid for p in mine if p.pid in seen or "resource_tracker" not in " ".join(_cmdline(p))]
    zombies = [p.pid for p in mine if _status(p) == psutil.STATUS_ZOMBIE]
    # Workers lost with a factory are orphans: the kernel hands them to init, which reaps them.
    deadline = time.monotonic() + 5.0
    while any(psutil.pid_exists(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    report(epoch_digests=digests, exactly_once=once, batches=batches, kills=len(killed),
           factory_kills=factory_kills, restarts=len(restarts), seen_pids=len(seen),
           children_after_close=children, zombie_children_after_close=zombies,
           running_after_5s=[p for p in seen if _running(p)],
           present_after_5s=[p for p in seen if psutil.pid_exists(p)],
           shm_files=[f for p in seen for f in glob.glob(f"/dev/shm/torch_{p}_*")],
           stack_files=[f for p in seen for f in glob.glob(f"/tmp/nostall-stack-{p}*")])


def _cmdline(proc) -> list:
    try:
        return proc.cmdline()
    except Exception:  # noqa: BLE001 - gone or a zombie
        return []


def _status(proc) -> str:
    try:
        return proc.status()
    except Exception:  # noqa: BLE001 - gone
        return "gone"


JOBS = {"epochs": job_epochs, "pickle": job_pickle, "ctrl_c": job_ctrl_c, "soak": job_soak}

# The script of the missing-guard scenario: everything at module level.
GUARDLESS = """\
from fault_datasets import Noisy
from {module} import DataLoader

loader = DataLoader(Noisy(64), batch_size=8, num_workers=2, multiprocessing_context="spawn")
for batch in loader:
    pass
print("finished")
"""
GUARDLESS_LINES = (4, 5)  # creates, iterates


# --------------------------------------------------------------------------- #
# Parent side: run programs in their own sessions, with a wall-clock limit.
# --------------------------------------------------------------------------- #

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")) if p))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def session_members(sid: int) -> list[dict]:
    """Live (non-zombie) processes of session ``sid``."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == sid:
                out.append(dict(pid=p.pid, name=p.info["name"]))
        except (ProcessLookupError, PermissionError):
            pass
    return out


class Child:
    """One program in a new session; stdout and stderr read as they come."""

    def __init__(self, argv: list[str], cwd: str | None = None):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=ENV, cwd=cwd, start_new_session=True)
        self.facts: dict = {}
        self.out: list[str] = []
        self.err: list[str] = []
        self.iterating = threading.Event()
        self._readers = [threading.Thread(target=self._read, args=(s, s is self.proc.stdout), daemon=True)
                         for s in (self.proc.stdout, self.proc.stderr)]
        for t in self._readers:
            t.start()

    def _read(self, stream, is_stdout: bool) -> None:
        for line in stream:
            if is_stdout and line.startswith("FACT "):
                self.facts.update(json.loads(line[5:]))
                if self.facts.get("iterating"):
                    self.iterating.set()
            else:
                (self.out if is_stdout else self.err).append(line.rstrip("\n"))

    def kill_all(self) -> None:
        """SIGKILL the process group and anything else left in the session."""
        sid = self.proc.pid
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in session_members(sid):
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass

    def finish(self, limit: float, tail: int = 40) -> dict:
        """Wait until ``limit`` seconds after the start; then kill what is left. The record
        (with the last ``tail`` lines of stderr)."""
        hung = False
        try:
            self.proc.wait(timeout=max(0.0, limit - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            hung = True
        wall = time.monotonic() - self.started
        ended = time.time()
        left = [] if hung else session_members(self.proc.pid)
        self.kill_all()
        self.proc.wait()
        for t in self._readers:
            t.join(5.0)
        lag = ended - self.facts["error_at"] if "error_at" in self.facts and not hung else None
        return dict(returncode=self.proc.returncode, wall_s=round(wall, 2), hung=hung, limit_s=limit,
                    exit_after_error_s=None if lag is None else round(lag, 2),
                    left_at_exit=left, facts=self.facts, stdout=self.out[-20:],
                    stderr_lines=len(self.err), stderr_tail=self.err[-tail:])


def child_argv(job: str, kind: str, opts: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", job, "--loader", kind,
            "--opts", json.dumps(opts)]


def run_job(job: str, kind: str, opts: dict, limit: float, label: str) -> dict:
    _say(f"  {kind:7s} {label} ...")
    record = Child(child_argv(job, kind, opts)).finish(limit)
    record.update(loader=kind, label=label, opts=opts)
    _say(f"          {'HUNG, killed' if record['hung'] else 'exit ' + str(record['returncode'])} "
         f"after {record['wall_s']:.1f} s")
    return record


def run_guardless(kind: str, limit: float, tmp: str) -> dict:
    _say(f"  {kind:7s} unguarded script under spawn ...")
    path = Path(tmp) / f"train_{kind}.py"
    path.write_text(GUARDLESS.format(module="torch.utils.data" if kind == "torch" else "nostall"))
    # All of stderr is kept for this one: its length and content are the outcome.
    record = Child([sys.executable, str(path)], cwd=tmp).finish(limit, tail=10_000)
    record.update(loader=kind, label="unguarded script under spawn", script=path.read_text())
    return record


def run_ctrl_c(kind: str, limit: float) -> dict:
    """SIGINT to the whole process group mid-epoch, as a terminal's Ctrl-C sends it."""
    import psutil

    _say(f"  {kind:7s} Ctrl-C mid-epoch ...")
    child = Child(child_argv("ctrl_c", kind, {}))
    sid = child.proc.pid
    if not child.iterating.wait(limit):
        record = child.finish(0)
        record.update(loader=kind, label="Ctrl-C mid-epoch", note="never reported iterating")
        return record
    time.sleep(0.5)  # well inside the first epoch (it lasts about 100 s)
    family = {p.pid for p in psutil.Process(sid).children(recursive=True)}
    t0 = time.monotonic()
    os.killpg(sid, signal.SIGINT)
    try:
        child.proc.wait(timeout=10.0)
        exit_s = round(time.monotonic() - t0, 2)
    except subprocess.TimeoutExpired:
        exit_s = None

    def left() -> list[int]:
        alive = set()
        for pid in family:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                pass
        return sorted(alive | {p["pid"] for p in session_members(sid)})

    left_at_exit = left()
    time.sleep(2.0)
    left_after_2s = left()
    record = child.finish(0)
    text = "\n".join(child.err)
    record.update(loader=kind, label="Ctrl-C mid-epoch", workers_before=sorted(family), exit_s=exit_s,
                  left_at_exit=left_at_exit, left_after_2s=left_after_2s,
                  leak_warnings="leaked semaphore" in text or "resource_tracker" in text,
                  stderr_lines=len(child.err))
    return record


# --------------------------------------------------------------------------- #
# Scenarios: runs, then a short outcome per loader
# --------------------------------------------------------------------------- #


def noisy(cls: str = "Noisy", **args) -> dict:
    return dict(cls=cls, args=dict(n=N_SAMPLES, **args))


def _digests(record: dict) -> list[str]:
    return [e["digest"] for e in record["facts"].get("epochs_done", [])]


def epochs_outcome(record: dict, expected: list[str], epochs: int) -> tuple[str, bool]:
    """'completed, batches identical (n restarts)' / 'crashed in epoch ...' / 'hung'; and whether
    every epoch completed with the undisturbed run's batches."""
    f = record["facts"]
    got = _digests(record)
    same = got == expected[:len(got)]
    same_txt = "identical to" if same else "DIFFERENT from"
    if record["hung"]:
        return (f"hung, killed after {record['limit_s']:g} s ({len(got)} of {epochs} epochs completed)", False)
    if "error" in f:
        text = (f"crashed in epoch {f['error_epoch']} after {f['error_batches']} batches, "
                f"{f['error_after_s']:.1f} s ({len(got)} of {epochs} epochs completed): {f['error']}")
        return text, False
    if not f.get("completed"):
        return f"exited with code {record['returncode']} ({len(got)} of {epochs} epochs completed)", False
    restarts = len(f.get("restarts", []))
    extra = f", {restarts} restart{'s' * (restarts != 1)}" if "restarts" in f else ""
    kills = f.get("kills", 0)
    what = ", ".join(x for x in (f"{kills} SIGKILL{'s' * (kills != 1)}" if kills else "", extra.lstrip(", ")) if x)
    text = (f"completed {len(got)}/{epochs} epochs in {f['done_after_s']:.1f} s, batches {same_txt} "
            f"the undisturbed run" + (f" ({what})" if what else ""))
    return text, same and len(got) == epochs


def restart_warning(text: str) -> str:
    """The gist of nostall's restart warning: who died how, and what was sent again."""
    text = text.removeprefix("RuntimeWarning: ")
    who = text.split(". ", 1)[0]
    again = re.search(r"sent its \d+ unfinished batch\(es\) again", text)
    return f'"{who}. ... {again.group(0)} ..."' if again else f'"{one_line("", text, 110)[2:]}"'


def scenario_kill_once(limit: float, baseline: dict) -> dict:
    opts = dict(dataset=noisy(), epochs=3, kill=dict(epoch=1, after=10))
    runs = {k: run_job("epochs", k, opts, limit, "SIGKILL worker 0 after 10 batches of epoch 1")
            for k in ("torch", "nostall")}
    cells, ok = {}, False
    for k, r in runs.items():
        cells[k], fine = epochs_outcome(r, _digests(baseline[k]), 3)
        if k == "nostall":
            ok = fine
            if r["facts"].get("warnings"):
                cells[k] += "; warned: " + restart_warning(r["facts"]["warnings"][0])
    return dict(key="kill_once", scenario="1. worker SIGKILLed mid-epoch (3 epochs)", runs=runs, cells=cells, ok=ok)


def scenario_kill_every(limit: float, baseline: dict) -> dict:
    opts = dict(dataset=noisy(), epochs=20, kill=dict(every=20))
    runs = {k: run_job("epochs", k, opts, limit, "SIGKILL every ~20 batches") for k in ("torch", "nostall")}
    cells = {k: epochs_outcome(r, _digests(baseline[k]), 20)[0] for k, r in runs.items()}
    ok = epochs_outcome(runs["nostall"], _digests(baseline["nostall"]), 20)[1]
    return dict(key="kill_every", scenario="2. SIGKILL about every 20 batches, 20 epochs (600 batches)",
                runs=runs, cells=cells, ok=ok)


def hang_report(record: dict) -> tuple[str, bool]:
    """An error about a hung batch: does it name the sample indices and the looping function?"""
    f = record["facts"]
    if record["hung"]:
        return f"hung, killed after {record['limit_s']:g} s (no error, no message)", False
    if "error" not in f:
        return f"no error (exit {record['returncode']})", False
    text = f["error_text"]
    m = re.search(r"sample indices (\[[^\]]*\])", text)
    has_bad = bool(m and re.search(rf"\b{BAD}\b", m.group(1)))
    has_fn = "spin_forever" in text
    named = [x for x, ok in ((f"sample indices {m.group(1) if m else ''}", has_bad), ("spin_forever", has_fn)) if ok]
    missing = [x for x, ok in ((f"the sample indices (incl. {BAD})", has_bad), ("the looping function", has_fn))
               if not ok]
    cell = f"{f['error_type']} after {f['error_after_s']:.1f} s"
    cell += f", naming {' and '.join(named)}" if named else ""
    cell += f"; does not name {' or '.join(missing)}" if missing else ""
    if not named:
        cell += f": {f['error']}"
    return cell, has_bad and has_fn


def scenario_hang(limit: float, baseline: dict, tmp: str) -> list[dict]:
    forever = noisy("Hangs", bad=BAD)
    once_torch = noisy("Hangs", bad=BAD, flag=str(Path(tmp) / "hung-torch"))
    once_nostall = noisy("Hangs", bad=BAD, flag=str(Path(tmp) / "hung-nostall"))
    a = {"torch": run_job("epochs", "torch", dict(dataset=forever, epochs=2), limit,
                          "sample hangs forever, timeout=0"),
         "nostall": run_job("epochs", "nostall", dict(dataset=forever, epochs=2, loader=dict(
             hang_timeout=HANG_TIMEOUT, on_hang="raise")), limit, "sample hangs forever, on_hang='raise'")}
    b = {"torch": run_job("epochs", "torch", dict(dataset=once_torch, epochs=2, loader=dict(timeout=10)), limit,
                          "sample hangs (first time only), timeout=10"),
         "nostall": run_job("epochs", "nostall", dict(dataset=once_nostall, epochs=2, loader=dict(
             hang_timeout=HANG_TIMEOUT)), limit, "sample hangs (first time only), on_hang='restart'")}
    ta = a["torch"]
    torch_a = (f"`timeout=0` (default): hung, killed after {ta['limit_s']:g} s" if ta["hung"]
               else "`timeout=0` (default): " + epochs_outcome(ta, _digests(baseline["torch"]), 2)[0])
    nostall_a, ok_a = hang_report(a["nostall"])
    tb = b["torch"]
    tf = tb["facts"]
    if "error" in tf:
        torch_b = (f"`timeout=10`: epoch lost, error after {tf['error_after_s']:.1f} s: {tf['error']}"
                   + ("" if "spin_forever" in tf["error_text"] else " (no sample index, no stack)"))
        if (tb["exit_after_error_s"] or 0) > 2:
            torch_b += f"; the process ended {tb['exit_after_error_s']:.0f} s after the error"
    else:
        torch_b = "`timeout=10`: " + epochs_outcome(tb, _digests(baseline["torch"]), 2)[0]
    nostall_b, ok_b = epochs_outcome(b["nostall"], _digests(baseline["nostall"]), 2)
    warned = [w for w in b["nostall"]["facts"].get("warnings", []) if "has been making" in w]
    if warned:
        nostall_b += "; warned: " + ("names spin_forever" if "spin_forever" in warned[0] else "no stack")
    hang = f"`hang_timeout={HANG_TIMEOUT:g}`"
    return [
        dict(key="hang_forever", scenario=f"3a. sample {BAD} hangs forever (pure-Python loop)", runs=a,
             cells={"torch": torch_a, "nostall": f'{hang}, `on_hang="raise"`: {nostall_a}'}, ok=ok_a),
        dict(key="hang_once", scenario=f"3b. sample {BAD} hangs forever the first time only (a retry would work)",
             runs=b, cells={"torch": torch_b, "nostall": f"{hang} (restart): {nostall_b}"}, ok=ok_b),
    ]


def raise_report(record: dict) -> tuple[str, bool]:
    f = record["facts"]
    if "error" not in f:
        return ("hung, killed" if record["hung"] else f"no error (exit {record['returncode']})"), False
    text = f["error_text"]
    checks = [
        (f"sample index {BAD}", bool(re.search(rf"\bindex {BAD}\b|indices \[[^\]]*\b{BAD}\b", text))),
        ("the epoch", bool(re.search(r"\bepoch \d+", text))),
        ("the worker", bool(re.search(r"\bworker\b", text))),
        ("the worker's traceback", "Traceback" in text and "__getitem__" in text),
    ]
    kept = f["error_type"] == "ValueError"
    names = [what for what, ok in checks if ok]
    missing = [what for what, ok in checks if not ok]
    cell = f"{f['error_type']} ({'type kept' if kept else 'type CHANGED'}) after {f['error_after_s']:.1f} s"
    cell += f"; names {', '.join(names)}" if names else ""
    cell += f"; does not name {' or '.join(missing)}" if missing else ""
    return cell, kept and not missing


def scenario_raises(limit: float) -> list[dict]:
    ds = noisy("Raises", bad=BAD)
    a = {k: run_job("epochs", k, dict(dataset=ds, epochs=2), limit, "sample raises ValueError")
         for k in ("torch", "nostall")}
    skip = run_job("epochs", "nostall", dict(dataset=ds, epochs=2, loader=dict(on_sample_error="skip")), limit,
                   "sample raises ValueError, on_sample_error='skip'")
    torch_a, _ = raise_report(a["torch"])
    nostall_a, ok_a = raise_report(a["nostall"])
    f = skip["facts"]
    done = f.get("epochs_done", [])
    skipped = [s for s in f.get("skipped", []) if s["epoch"] < 2]
    ok_b = (bool(f.get("completed")) and len(done) == 2 and all(e["samples"] == N_SAMPLES - 1 for e in done)
            and sorted(s["index"] for s in skipped) == [BAD, BAD])
    if f.get("completed"):
        listed = ", ".join(f"index {s['index']} (epoch {s['epoch']})" for s in skipped) or "nothing"
        nostall_b = (f"completed {len(done)}/2 epochs, {' and '.join(str(e['samples']) for e in done)} of "
                     f"{N_SAMPLES} samples per epoch; `loader.stats.skipped` lists {listed}")
    else:
        nostall_b = epochs_outcome(skip, [], 2)[0]
    return [
        dict(key="raises", scenario=f"4a. sample {BAD} raises ValueError (message without the index)", runs=a,
             cells={"torch": torch_a, "nostall": nostall_a}, ok=ok_a),
        dict(key="raises_skip", scenario="4b. the same, leaving the bad sample out",
             runs={"nostall": skip},
             cells={"torch": "no such option (not run): a wrapper around `__getitem__` is needed",
                    "nostall": '`on_sample_error="skip"`: ' + nostall_b}, ok=ok_b),
    ]


def guard_report(record: dict) -> tuple[str, bool]:
    text = "\n".join(record["stderr_tail"] + record["stdout"])
    create, iterate = GUARDLESS_LINES
    in_words = sorted({int(n) for n in re.findall(r'(?<!", )\bline (\d+)\b', text)} & {create, iterate})
    in_frames = sorted({int(n) for n in re.findall(r'train_\w+\.py", line (\d+)', text)} & {create, iterate})
    guard = bool(re.search(r"""if __name__ == ['"]__main__['"]""", text))
    if record["hung"]:
        return f"hung, killed after {record['limit_s']:g} s ({record['stderr_lines']} stderr lines)", False
    parts = [f"exit {record['returncode']} after {record['wall_s']:.1f} s, {record['stderr_lines']} stderr lines"]
    if in_words:
        parts.append(f"says which lines ({', '.join(map(str, in_words))}) in words")
    if in_frames:
        parts.append(f"shows line{'s' * (len(in_frames) > 1)} {', '.join(map(str, in_frames))} in traceback frames")
    if not in_words and not in_frames:
        parts.append("does not name the offending line")
    parts.append("shows the `if __name__ == \"__main__\":` idiom" if guard else "does not mention the guard")
    final = [line for line in record["stderr_tail"] if re.match(r"[A-Za-z_.]*(Error|Exception|Exit)\b", line)]
    cell = "; ".join(parts) + (f"; final error: {one_line('', final[-1], 210)[2:]}" if final else "")
    return cell, record["returncode"] != 0 and bool(in_words) and guard


def scenario_guard(limit: float, tmp: str) -> dict:
    runs = {}
    for kind in ("torch", "nostall"):
        runs[kind] = run_guardless(kind, limit, tmp)
    cells = {k: guard_report(r)[0] for k, r in runs.items()}
    return dict(key="guard", scenario="5. no `__main__` guard under spawn (loader built and iterated at module level)",
                runs=runs, cells=cells, ok=guard_report(runs["nostall"])[1])


def scenario_pickle(limit: float) -> dict:
    runs = {k: run_job("pickle", k, {}, limit, "dataset.transform['fn'] is a lambda, spawn")
            for k in ("torch", "nostall")}
    cells, ok = {}, False
    for k, r in runs.items():
        f = r["facts"]
        if "error" not in f:
            cells[k] = "hung, killed" if r["hung"] else "no error"
            continue
        text = f["error_text"]
        names_attr = "transform" in text
        what = ("names the attribute path" if names_attr else
                "names the lambda, not the attribute" if "lambda" in text else "names neither attribute nor lambda")
        cells[k] = f"{what}: {one_line(f['error_type'], text, 120)}"
        if k == "nostall":
            ok = "dataset.transform['fn']" in text
    return dict(key="pickle", scenario="6. unpicklable dataset under spawn (a lambda in `dataset.transform['fn']`)",
                runs=runs, cells=cells, ok=ok)


def scenario_ctrl_c(limit: float) -> dict:
    runs = {k: run_ctrl_c(k, limit) for k in ("torch", "nostall")}
    cells = {}
    for k, r in runs.items():
        if r.get("exit_s") is None:
            cells[k] = f"still running 10 s after SIGINT; {r.get('note', '')}".rstrip("; ")
            continue
        leaks = "leak warnings on stderr" if r["leak_warnings"] else "no leak warnings"
        cells[k] = (f"exited {r['exit_s']:.2f} s after SIGINT (code {r['returncode']}), "
                    f"{len(r['left_at_exit'])} processes left at exit, {len(r['left_after_2s'])} after 2 s, "
                    f"{leaks}, {r['stderr_lines']} stderr lines")
    n = runs["nostall"]
    ok = n.get("exit_s") is not None and n["exit_s"] <= 2.0 and not n["left_at_exit"] and not n["leak_warnings"]
    return dict(key="ctrl_c", scenario="7. Ctrl-C (SIGINT to the process group) mid-epoch", runs=runs,
                cells=cells, ok=ok)


SOAK = dict(n=640, epochs=10, every=10, ms=1.0)  # 80 batches of 8 per epoch, 800 in all


def scenario_soak(limit: float) -> list[dict]:
    """Per start method: an undisturbed run and one with a random process of the loader's
    tree SIGKILLed every 10 batches; the same generator, nostall's defaults."""
    rows = []
    for method in ("fork", "spawn"):
        calm = run_job("soak", "nostall", dict(SOAK, method=method, every=0), limit, f"soak, {method}, undisturbed")
        hit = run_job("soak", "nostall", dict(SOAK, method=method), limit,
                      f"soak, {method}, SIGKILL every {SOAK['every']} batches")
        c, f = calm["facts"], hit["facts"]
        digests = f.get("epoch_digests", [])
        identical = bool(digests) and digests == c.get("epoch_digests")
        left = {
            "processes": len(f.get("children_after_close", [])) + len(hit["left_at_exit"]),
            "zombies": len(f.get("zombie_children_after_close", [])),
            "after 5 s": len(f.get("present_after_5s", [])),
            "shm files": len(f.get("shm_files", [])),
            "stack files": len(f.get("stack_files", [])),
        }
        leftovers = "none" if not any(left.values()) else ", ".join(f"{v} {k}" for k, v in left.items() if v)
        if "error" in f or hit["hung"]:
            leftovers += f"; FAILED: {f.get('error', 'hung')}"
        ok = (bool(f.get("completed")) and identical and f.get("exactly_once") is True and leftovers == "none"
              and len(digests) == SOAK["epochs"])
        rows.append(dict(method=method, runs={"undisturbed": calm, "soak": hit}, ok=ok, cells=[
            method, f"{f.get('kills', 0)} ({f.get('factory_kills', 0)})", f"{len(digests)}/{SOAK['epochs']}",
            str(f.get("batches", 0)), "yes" if identical else "NO",
            "yes" if f.get("exactly_once") and len(digests) == SOAK["epochs"] else "NO", leftovers,
            f"{f.get('done_after_s', float('nan')):.1f} s ({c.get('done_after_s', float('nan')):.1f} s)"]))
    return rows


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=float, default=60.0, help="seconds before a run counts as hung (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run")
    p.add_argument("--out", default="bench-results/bench_faults.json", help="JSON output path")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--loader", choices=("torch", "nostall"), help=argparse.SUPPRESS)
    p.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        JOBS[args.child](args.loader, json.loads(args.opts))
        return 0
    from nostall.cli._measure import environment_info

    started = time.monotonic()
    rows: list[dict] = []
    baseline: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        if {"kill_once", "kill_every", "hang"} & set(args.only):
            _say("undisturbed runs (20 epochs) ...")
            baseline = {k: run_job("epochs", k, dict(dataset=noisy(), epochs=20), args.limit, "undisturbed")
                        for k in ("torch", "nostall")}
        steps = [
            ("kill_once", lambda: [scenario_kill_once(args.limit, baseline)]),
            ("kill_every", lambda: [scenario_kill_every(args.limit, baseline)]),
            ("hang", lambda: scenario_hang(args.limit, baseline, tmp)),
            ("raises", lambda: scenario_raises(args.limit)),
            ("guard", lambda: [scenario_guard(args.limit, tmp)]),
            ("pickle", lambda: [scenario_pickle(args.limit)]),
            ("ctrl_c", lambda: [scenario_ctrl_c(args.limit)]),
        ]
        for key, step in steps:
            if key in args.only:
                _say(f"{key} ...")
                rows.extend(step())
        soak = []
        if "soak" in args.only:
            _say("soak ...")
            soak = scenario_soak(max(args.limit, 300.0))
    duration = time.monotonic() - started
    env = environment_info()
    print(f"Machine: {env['cpu_count']} CPUs, Python {env['python']}, torch {env['torch']}, {env['platform']}. "
          f"Duration: {duration:.0f} s. Runs killed after {args.limit:g} s count as hung.\n")
    if rows:
        print("| scenario | torch's DataLoader | nostall |")
        print("|---|---|---|")
    for r in rows:
        print(f"| {_cell(r['scenario'])} | {_cell(r['cells'].get('torch', ''))} | {_cell(r['cells']['nostall'])} |")
    if soak:
        print(f"\nSoak: nostall's defaults, {SOAK['n']} samples, batch 8, 2 workers, {SOAK['epochs']} epochs; "
              f"a random process of the loader's tree (a worker or the factory) SIGKILLed every {SOAK['every']} "
              "batches, against an undisturbed run with the same generator.\n")
        print("| start method | SIGKILLs (of the factory) | epochs | batches | batches identical | every index "
              "exactly once | left behind | wall time (undisturbed) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in soak:
            print("| " + " | ".join(_cell(c) for c in r["cells"]) + " |")
    short = [r["scenario"] for r in rows if not r["ok"]] + [f"soak ({r['method']})" for r in soak if not r["ok"]]
    print("\nnostall fell short in: " + "; ".join(short) if short else "\nnostall did what it documents in every scenario.")
    if baseline:
        print("Undisturbed runs (20 epochs): " + ", ".join(
            f"{k} {b['facts'].get('done_after_s', float('nan')):.1f} s" for k, b in baseline.items()) + ".")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["benchmarks/bench_faults.py", *args.argv]), "environment": env,
        "limit_s": args.limit, "duration_s": round(duration, 1), "baseline": baseline,
        "rows": [{k: v for k, v in r.items()} for r in rows], "soak": soak, "nostall_fell_short": short,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
