"""Shared fixtures and helpers for the conformance suite.

Loader implementations are named by strings so tests can be parametrized over them:

* ``"torch"``          - ``torch.utils.data.DataLoader`` (the reference);
* ``"nostall"``        - ``nostall.DataLoader(..., worker_type="process")``;
* ``"nostall-thread"`` - ``nostall.DataLoader(..., worker_type="thread")``.

Process workers use the ``fork`` start method unless a test asks for another one
(``spawn`` costs a torch import per worker).  Every loader made through the
``loaders`` fixture is closed (nostall) or has its workers shut down (torch) at
teardown, so one test's workers never leak into the next test's process checks.

While nostall is under construction, set ``NOSTALL_ALLOW_MISSING=1`` to skip the
nostall parameters when ``import nostall`` fails; by default a failing import is an
error, not a skip.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
import warnings

import numpy as np
import psutil
import pytest
import torch
import torch.utils.data

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
SRC_DIR = os.path.join(REPO_DIR, "src")

# Test the working tree's nostall, and make ``import toy_datasets`` work in this process
# and (through the inherited sys.path) in spawned workers. (Not named ``datasets``: that
# would shadow Hugging Face's library, which tests/test_libraries.py uses.)
for _p in (TESTS_DIR, SRC_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Every process a test starts runs tests/_site/sitecustomize.py (torchvision beside a CPU torch).
_SITE_DIR = os.path.join(TESTS_DIR, "_site")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SITE_DIR, TESTS_DIR] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
if not any(type(f).__name__ == "_EnsureTorchvision" for f in sys.meta_path):  # this process started before it
    import runpy  # noqa: E402

    runpy.run_path(os.path.join(_SITE_DIR, "sitecustomize.py"))

import toy_datasets as _datasets  # noqa: E402

assert os.path.dirname(os.path.abspath(_datasets.__file__)) == TESTS_DIR, (
    f"`toy_datasets` resolved to {_datasets.__file__}, not the suite's tests/toy_datasets.py"
)

IMPLS = ("torch", "nostall", "nostall-thread")
NOSTALL_IMPLS = ("nostall", "nostall-thread")
PROCESS_IMPLS = ("torch", "nostall")


def nostall_module():
    """Import nostall; skip only when NOSTALL_ALLOW_MISSING=1 and it does not import."""
    try:
        import nostall

        nostall.DataLoader  # noqa: B018 - must exist
        return nostall
    except Exception as exc:  # pragma: no cover - only while nostall is being written
        if os.environ.get("NOSTALL_ALLOW_MISSING") == "1":
            pytest.skip(f"nostall not importable yet: {exc!r}")
        raise


def impl_nw(impls=IMPLS, num_workers=(0, 2)):
    """(impl, num_workers) pairs; thread vs process makes no difference at 0 workers."""
    out = []
    for impl in impls:
        for nw in num_workers:
            if impl == "nostall-thread" and nw == 0:
                continue
            out.append(pytest.param(impl, nw, id=f"{impl}-nw{nw}"))
    return out


def close_loader(loader) -> None:
    close = getattr(loader, "close", None)
    if callable(close):
        close()
        return
    # torch: persistent workers live in loader._iterator until it is shut down.
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


class LoaderFactory:
    """Builds loaders for an implementation name and closes them all at teardown."""

    def __init__(self):
        self.created = []

    def cls(self, impl):
        if impl == "torch":
            return torch.utils.data.DataLoader
        return nostall_module().DataLoader

    def make(self, impl, dataset, **kw):
        assert impl in IMPLS, impl
        nw = kw.get("num_workers", 0)
        if impl != "torch":
            kw.setdefault("worker_type", "thread" if impl == "nostall-thread" else "process")
        if nw > 0 and impl != "nostall-thread":
            kw.setdefault("multiprocessing_context", "fork")
        loader = self.cls(impl)(dataset, **kw)
        self.created.append(loader)
        return loader

    def close_all(self):
        while self.created:
            close_loader(self.created.pop())


@pytest.fixture
def loaders():
    factory = LoaderFactory()
    try:
        yield factory
    finally:
        factory.close_all()


def _is_helper_process(proc: psutil.Process) -> bool:
    """multiprocessing's resource tracker / forkserver are per-interpreter singletons."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return True
    return "resource_tracker" in cmd or "forkserver" in cmd


def descendant_pids(include_helpers: bool = False) -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        if include_helpers or not _is_helper_process(p):
            out.add(p.pid)
    return out


def alive(pids) -> set[int]:
    """The pids that still name a running (non-zombie) process."""
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids, timeout: float) -> set[int]:
    """Wait (polling process state) until none of ``pids`` runs; return survivors."""
    deadline = time.monotonic() + timeout
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = alive(left)
    return left


@pytest.fixture(autouse=True)
def _reap_stray_workers():
    """Kill worker processes a test left behind so they cannot disturb later tests."""
    before = descendant_pids()
    yield
    new = descendant_pids() - before
    if not new:
        return
    gc.collect()  # torch shuts abandoned iterators' workers down in __del__
    stray = wait_gone(new, timeout=5.0)
    if stray:
        warnings.warn(f"test left worker processes running: {sorted(stray)}; killing them")
        for pid in stray:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


# --------------------------------------------------------------------------- comparison


def assert_same(expected, got, path="batch"):
    """Exact recursive equality: types, dtypes, shapes and values."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: expected a Tensor, got {type(got).__name__}: {got!r}"
        assert got.dtype == expected.dtype, f"{path}: dtype {got.dtype} != expected {expected.dtype}"
        assert got.shape == expected.shape, f"{path}: shape {tuple(got.shape)} != expected {tuple(expected.shape)}"
        assert torch.equal(got, expected), f"{path}: values differ:\n expected {expected}\n got      {got}"
    elif isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray), f"{path}: expected ndarray, got {type(got).__name__}"
        assert got.dtype == expected.dtype and got.shape == expected.shape, f"{path}: {got.dtype}{got.shape} != {expected.dtype}{expected.shape}"
        assert np.array_equal(got, expected), f"{path}: values differ: expected {expected}, got {got}"
    elif isinstance(expected, dict):
        assert isinstance(got, dict), f"{path}: expected dict, got {type(got).__name__}"
        assert list(got.keys()) == list(expected.keys()), f"{path}: keys {list(got)} != expected {list(expected)}"
        for k in expected:
            assert_same(expected[k], got[k], f"{path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected), f"{path}: type {type(got).__name__} != expected {type(expected).__name__}"
        assert len(got) == len(expected), f"{path}: length {len(got)} != expected {len(expected)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            assert_same(e, g, f"{path}[{i}]")
    else:
        assert type(got) is type(expected), f"{path}: type {type(got).__name__} != expected {type(expected).__name__} ({got!r} vs {expected!r})"
        if isinstance(expected, float) and math.isnan(expected):
            assert math.isnan(got), f"{path}: {got!r} != nan"
        else:
            assert got == expected, f"{path}: {got!r} != expected {expected!r}"


def assert_same_epochs(expected_epochs, got_epochs):
    assert len(got_epochs) == len(expected_epochs), f"{len(got_epochs)} epochs != expected {len(expected_epochs)}"
    for e, (exp, got) in enumerate(zip(expected_epochs, got_epochs)):
        assert len(got) == len(exp), f"epoch {e}: {len(got)} batches != expected {len(exp)}"
        for b, (x, y) in enumerate(zip(exp, got)):
            assert_same(x, y, f"epoch {e} batch {b}")


def run_epochs(loader, epochs):
    return [list(loader) for _ in range(epochs)]


def reference_epochs(dataset, epochs=1, seed=None, **kw):
    """torch's DataLoader with num_workers=0 and the same arguments.

    ``seed``: if given, a fresh ``torch.Generator().manual_seed(seed)`` is passed.
    """
    kw = {k: v for k, v in kw.items()
          if k not in ("num_workers", "multiprocessing_context", "prefetch_factor",
                       "persistent_workers", "worker_type", "in_order", "timeout")}
    if seed is not None:
        kw["generator"] = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, num_workers=0, **kw)
    return run_epochs(loader, epochs), len_or_error(loader)


def len_or_error(loader):
    try:
        return len(loader)
    except Exception as exc:  # same exception type is the contract then
        return type(exc)


def flat_indices(batches):
    out = []
    for b in batches:
        out.extend(b.tolist() if isinstance(b, torch.Tensor) else list(b))
    return out
