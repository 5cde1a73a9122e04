"""Per-batch seeding: a batch's randomness depends on (base seed, epoch, batch number) only.

Workers reseed Python's ``random``, NumPy's global generator and torch's default
generator before every batch, so a batch is the same whichever worker makes it and
however many workers there are. In-process loading (``num_workers=0``) does the same
but saves and restores the caller's RNG state around each batch, so the training
loop's own random stream is untouched.

A ``worker_init_fn`` that seeds one of these generators (``torch.manual_seed(s)``,
``np.random.seed(s)``, ``random.seed(s)``) wins in that worker, as in torch: the
worker compares each generator before and after it (:func:`reseeded_since`) and
no longer seeds a reseeded one per batch. A ``worker_init_fn`` that only draws
from a generator does not count as seeding it.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import torch

try:
    import numpy as np
    import numpy.random  # noqa: F401  (numpy imports it lazily: here once, not in every worker)
except ImportError:  # numpy is a dependency, but keep the loader usable without it
    np = None

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def batch_seed(base_seed: int, epoch: int, batch_no: int) -> int:
    """Return the 63-bit seed of batch ``batch_no`` of ``epoch`` (cheap: three mixes)."""
    x = _splitmix64(base_seed & _MASK64)
    x = _splitmix64(x ^ (epoch & _MASK64))
    x = _splitmix64(x ^ (batch_no & _MASK64))
    return x >> 1


GLOBALS = frozenset(("random", "numpy", "torch"))  # the global generators nostall seeds per batch


def seed_globals(seed: int, which: frozenset = GLOBALS) -> None:
    """Seed ``random``, ``numpy.random`` and torch's default generator (those named
    in ``which``) from ``seed``."""
    if "random" in which:
        random.seed(seed)
    # torch.manual_seed would also seed every accelerator (~100x slower per batch);
    # workers make CPU batches, so the CPU generator is the one that matters.
    if "torch" in which:
        torch.default_generator.manual_seed(seed)
    if np is not None and "numpy" in which:
        np.random.seed(seed & 0xFFFFFFFF)


def global_snapshot() -> tuple:
    """What :func:`reseeded_since` compares: torch's initial seed, random's and numpy's states."""
    return (torch.initial_seed(), random.getstate(), np.random.get_state() if np is not None else None)


_MT_WORDS = 624  # 32-bit words one Mersenne Twister state yields before it regenerates
_MAX_TWISTS = 64  # draws of up to ~40,000 words are told apart from a reseed


def _python_drew_only(before, after) -> bool:
    if before[1][:-1] == after[1][:-1]:
        return True  # same keys: only the position (or the cached gauss) moved
    probe = random.Random()
    probe.setstate(before)
    for _ in range(_MAX_TWISTS):
        probe.getrandbits(32 * _MT_WORDS)  # 624 words: the key array regenerates once
        if probe.getstate()[1][:-1] == after[1][:-1]:
            return True
    return False


def _numpy_drew_only(before, after) -> bool:
    if np.array_equal(before[1], after[1]):
        return True
    probe = np.random.MT19937()
    probe.state = {"bit_generator": "MT19937", "state": {"key": before[1], "pos": before[2]}}
    for _ in range(_MAX_TWISTS):
        probe.random_raw(_MT_WORDS)
        if np.array_equal(probe.state["state"]["key"], after[1]):
            return True
    return False


def reseeded_since(before: tuple) -> frozenset:
    """The global generators seeded (or set) since ``before`` (:func:`global_snapshot`);
    draws alone are not seeding. torch's is told by its initial seed."""
    torch_seed, py, npy = before
    found = set()
    if torch.initial_seed() != torch_seed:
        found.add("torch")
    now = random.getstate()
    if now != py and not _python_drew_only(py, now):
        found.add("random")
    if np is not None:
        now_np = np.random.get_state()
        if not (np.array_equal(now_np[1], npy[1]) and now_np[2:] == npy[2:]) and not _numpy_drew_only(npy, now_np):
            found.add("numpy")
    return frozenset(found)


class saved_global_rng:
    """Context manager that restores the global RNG states it found on entry."""

    __slots__ = ("_state",)

    def __enter__(self):
        self._state = (
            random.getstate(),
            torch.get_rng_state(),
            np.random.get_state() if np is not None else None,
        )
        return self

    def __exit__(self, *exc):
        py, th, npy = self._state
        random.setstate(py)
        torch.set_rng_state(th)
        if npy is not None:
            np.random.set_state(npy)
        return False


def global_rng_fingerprint() -> tuple:
    """The full state of every global RNG, comparable with ``==`` (used once per epoch)."""
    npy = None
    if np is not None:
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        npy = (keys.tobytes(), pos, has_gauss, gauss)
    return (random.getstate(), torch.get_rng_state().numpy().tobytes(), npy)


@dataclass(frozen=True)
class WorkerRNG:
    """Per-thread generators for thread workers (global RNGs are shared between threads).

    ``random_generator`` is a ``random.Random``, ``torch_generator`` a ``torch.Generator``
    and ``numpy_generator`` a ``numpy.random.Generator``; all are reseeded per batch
    exactly like the globals are in process workers.
    """

    random_generator: random.Random
    torch_generator: torch.Generator
    numpy_generator: object | None

    @classmethod
    def create(cls) -> WorkerRNG:
        return cls(
            random.Random(),
            torch.Generator(),
            np.random.default_rng() if np is not None else None,
        )

    def reseed(self, seed: int) -> None:
        self.random_generator.seed(seed)
        self.torch_generator.manual_seed(seed)
        if np is not None:
            # numpy Generators cannot be reseeded in place; swap the bit generator.
            self.numpy_generator.bit_generator.state = np.random.PCG64(seed).state


class ThreadWorkerRNG:
    """``get_worker_info().rng`` in a nostall thread worker, with the fields of torch's
    thread-worker ``_RNG``, so ``torch.thread_safe_generator()`` and transforms written
    for torch's thread workers work unchanged.

    Each field is the generator seeded for the batch being made (see :func:`worker_rng`):
    torch's and Python's draw what the global generators draw in a process worker making
    the same batch. Outside a batch (``worker_init_fn``) it is this worker's own,
    seeded with the worker seed as torch seeds a worker.
    """

    __slots__ = ("_own",)

    def __init__(self, seed: int):
        self._own = WorkerRNG.create()
        self._own.reseed(seed)

    @property
    def random_generator(self) -> random.Random:
        return (worker_rng() or self._own).random_generator

    @property
    def torch_generator(self) -> torch.Generator:
        return (worker_rng() or self._own).torch_generator

    @property
    def numpy_generator(self):
        return (worker_rng() or self._own).numpy_generator


_thread_rng = threading.local()


def worker_rng() -> WorkerRNG | None:
    """Return generators seeded for the batch being made, or ``None`` outside one.

    While a nostall worker (process or thread) or in-process loading makes a batch,
    this returns a :class:`WorkerRNG` seeded from (base seed, epoch, batch number).
    Thread workers share the global ``random``/``numpy.random``/``torch`` generators,
    so dataset code that must give the same batches under ``worker_type="thread"``
    draws from these instead. Seeding happens on first use in a batch, so datasets
    that never call it pay nothing.
    """
    state = getattr(_thread_rng, "state", None)
    if state is None:
        return None
    rng, seed = state
    if seed is not None:
        rng.reseed(seed)
        _thread_rng.state = (rng, None)
    return rng


def _begin_batch(rng: WorkerRNG, seed: int) -> None:
    _thread_rng.state = (rng, seed)


def _end_batch() -> None:
    _thread_rng.state = None
