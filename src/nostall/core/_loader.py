"""``nostall.DataLoader``: torch's DataLoader arguments, persistent overlapped epochs."""

from __future__ import annotations

import functools
import importlib.util
import warnings
import weakref
from typing import TypeVar

import torch
import torch.utils.data as tud
from torch.autograd import _profiler_enabled
from torch.autograd.profiler import record_function

from ..control import _autotune
from ..workers import _datapipes
from . import _compat, _resume
from ._arguments import (as_count, check_generator, constructor_hint, explain, is_auto, iter_error, positive,
                         sync_dataset)
from .._config import PoolConfig
from .._options import check_loader_arguments
from ._torch_versions import HAS_IN_ORDER, accelerator
from ..observe._cpus import local_cpu_budget
from ._distributed import advance_epoch, shard_sampler
from ._engine import Engine
from ._plan import Planner
from ..observe._stats import LoaderStats, MeasuredIterator, Recorder, _clock
from ..workers._worker import WorkSpec

_pin_warned = False
_T_co = TypeVar("_T_co", covariant=True)


def _warn_pin_memory_once() -> None:
    global _pin_warned
    if not _pin_warned:
        _pin_warned = True
        warnings.warn(
            "'pin_memory' argument is set as true but no accelerator is found, then device "
            "pinned memory won't be used.",
            stacklevel=4,
        )


class DataLoader(tud.DataLoader[_T_co]):
    """A drop-in ``torch.utils.data.DataLoader`` whose workers persist and never pause.

    Every argument has torch's meaning and torch's validation. Differences, each
    chosen because torch's default causes a known pain:

    * ``persistent_workers`` defaults to True when ``num_workers > 0``; the next
      epoch's first batches are made while the current epoch's last ones are
      consumed, so there is no pause between epochs. ``persistent_workers=False``
      gives torch's transient workers (for comparison).
    * Randomness inside workers is seeded per batch from (base seed, epoch, batch
      number), so batches do not depend on ``num_workers`` or on which worker made
      them. See ``nostall.core._plan`` for exactly when the global RNG is drawn. A
      ``worker_init_fn`` that seeds torch's, numpy's or Python's global generator
      wins in that worker, as in torch: nostall stops seeding that generator per
      batch there and warns once (draws from it then depend on the worker).
    * Process workers keep the dataset as it was at the first ``iter()``, as torch's
      persistent workers do, except for datasets that take part in epochs or resume
      (they define ``set_epoch`` or ``load_state_dict``): attributes reassigned on
      those in this process (``set_epoch`` setting ``self.epoch``) reach the workers
      before their next batch. ``sync_dataset_attributes=True`` asks for that copy
      for any dataset, ``False`` turns it off.
    * ``worker_type="thread"`` runs workers as threads of this process (for datasets
      that wait on I/O and release the GIL); ``"process"`` (default) uses processes
      forked from one factory process, so ``spawn`` starts in about the time of one
      interpreter, not ``num_workers`` of them; ``"auto"`` starts with processes and
      switches to threads when the workers mostly wait (see ``nostall.control._autotune``);
      ``"ray"`` makes batches in ``num_workers`` Ray actors, on any machine of a Ray
      cluster (``ray_actor_options`` goes to each actor's ``.options()``; default
      ``num_cpus=1``), with the same batches and guarantees (see ``nostall.workers._ray_pool``;
      ``pip install 'nostall[ray]'``).
    * ``num_workers="auto"`` / ``prefetch_factor="auto"`` tune themselves while the
      loop runs (``loader.stats.tuner`` says what changed and why). The attributes
      ``loader.num_workers`` and ``loader.prefetch_factor`` stay ints, as tools
      comparing them expect (the values in use now); ``num_workers_setting`` and
      ``prefetch_factor_setting`` say ``"auto"``.

    Invalid arguments raise torch's exception with torch's message, at the moment
    torch raises it (construction, or ``iter()`` for e.g. ``timeout`` without
    workers or a ``generator`` that is not a ``torch.Generator``); nostall's
    explanation, when it has one, follows in parentheses.

    At most ``num_workers * prefetch_factor`` batches are in flight at once (made
    or being made but not yet returned to you), including those prepared for the
    next epoch. Release workers with :meth:`close` or a ``with`` block; they are
    also released when the loader is garbage-collected and at interpreter exit.

    ``loader.stats`` tells where the time goes (waiting for data versus the loop's
    own work, pauses, throughput, workers' busy fractions, peak memory); it costs
    about a microsecond per batch, and ``stats=False`` turns it off.

    Supervision (process workers): a worker that dies is replaced and its batches
    made again, identical, as long as batches keep being delivered (so is the worker
    factory, the process that forks them, with the workers that die with it: one
    failure, listed in ``loader.stats.restarts``); the loader raises
    when one batch ended its worker twice (naming its sample indices) or after more
    than ``max_worker_restarts`` failures in a row with no batch delivered; a batch slower than
    ``hang_timeout`` seconds (default: 20 times the median batch, at least 30 s) is
    reported with the worker's Python stack, then the worker is restarted or the
    loader raises (``on_hang="restart"|"raise"``). ``on_sample_error="skip"`` leaves
    failing samples out of their batch (listed in ``loader.stats.skipped``) until
    more than ``max_skipped_fraction`` of an epoch's samples failed.

    A loader's workers belong to the process that started them. In a forked child
    (``os.fork()`` or a ``fork``-started multiprocessing child) ``iter()``, ``next()``
    on an existing iterator and ``worker_pids()`` raise a RuntimeError saying so (make
    a new loader there); closing, dropping or exiting with the copy leaves the
    parent's workers running. A ``KeyboardInterrupt`` or ``SystemExit`` raised by
    dataset code in a worker is reported once, as a RuntimeError naming it and the
    sample; it is not taken for a crash. Workers are named ``nostall-worker-N`` in
    ``ps -o args`` (``nostall-wkr-N`` in ``top``, ``ps -e`` and OOM reports), the
    factory ``nostall-factory``.

    ``max_inflight_bytes`` bounds the batches in flight in bytes as well (once the
    first batch's size is known), for large batches on machines short of memory.
    """

    def __init__(
        self,
        dataset,
        batch_size=1,
        shuffle=None,
        sampler=None,
        batch_sampler=None,
        num_workers=0,
        collate_fn=None,
        pin_memory=False,
        drop_last=False,
        timeout=0,
        worker_init_fn=None,
        multiprocessing_context=None,
        generator=None,
        *,
        prefetch_factor=None,
        persistent_workers=None,
        pin_memory_device="",
        in_order=True,
        worker_type="process",
        ray_actor_options=None,
        stats=True,
        max_worker_restarts=3,
        hang_timeout=None,
        on_hang="restart",
        on_sample_error="raise",
        max_skipped_fraction=0.01,
        max_inflight_bytes=None,
        sync_dataset_attributes=None,
    ):
        auto_workers, auto_prefetch = is_auto(num_workers), is_auto(prefetch_factor)
        if auto_workers:
            num_workers = _autotune.MAX_WORKERS  # the most the tuner may use
        if auto_prefetch:
            prefetch_factor = 2  # where the tuner starts; torch refuses any prefetch_factor without workers
        # Under torch.distributed each rank loads its own shard (see nostall.core._distributed).
        self._nostall_shard_sampler = shard_sampler(
            dataset, sampler=sampler, batch_sampler=batch_sampler, shuffle=shuffle,
            drop_last=drop_last, generator=generator,
        )
        if self._nostall_shard_sampler is not None:
            sampler, shuffle = self._nostall_shard_sampler, None  # torch refuses shuffle=True with a sampler
        self._nostall_sampler_epoch = 0  # the sampler's epoch as nostall last set it
        explicit_persistent = bool(persistent_workers)
        if persistent_workers is None:
            persistent_workers = positive(num_workers)
        extra = {"in_order": in_order} if HAS_IN_ORDER else {}
        # torch validates first, with its own exception types and messages; nostall only
        # adds its explanation after torch's message.
        try:
            with warnings.catch_warnings():
                if auto_workers or worker_type == "ray":  # torch's "more workers than CPUs" warning:
                    # "auto" starts few, and Ray actors use the cluster's CPUs, not this machine's
                    warnings.filterwarnings("ignore", message=".*worker processes in total.*")
                super().__init__(
                    dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn,
                    pin_memory, drop_last, timeout, worker_init_fn, multiprocessing_context, generator,
                    prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                    pin_memory_device=pin_memory_device, **extra,
                )
        except (TypeError, ValueError) as exc:
            explain(exc, constructor_hint(num_workers, auto_prefetch))
            raise
        if auto_workers and self._dataset_kind == 1:
            raise ValueError(
                "`num_workers='auto'` needs a map-style dataset: an iterable dataset shards its stream "
                "by the number of workers, which 'auto' changes. Pass a number of workers."
            )
        # torch checks these when an iterator is made, not here: so does nostall (__iter__).
        self._nostall_iter_error = iter_error(num_workers, self.__dict__["prefetch_factor"], timeout)
        workers = as_count(num_workers)
        if worker_type == "auto" and (self._dataset_kind == 1 or workers == 0):
            raise ValueError(
                "`worker_type='auto'` needs a map-style dataset and num_workers > 0 (it may switch "
                "running workers from processes to threads, and an iterable dataset's workers each "
                f"hold a stream position); got {'an iterable dataset' if self._dataset_kind == 1 else 'num_workers=0'}. "
                "Pass worker_type='process' or 'thread'."
            )
        if worker_type == "ray" and not _ray_installed():
            raise ImportError("`worker_type='ray'` makes batches in Ray actors, and Ray is not installed here. "
                              "Install it with `pip install 'nostall[ray]'`, or use worker_type='process'.")
        if worker_type == "ray" and workers == 0:
            raise ValueError(
                "`worker_type='ray'` makes batches in `num_workers` Ray actors; got num_workers=0. "
                "Pass num_workers >= 1 (or 'auto'), or leave worker_type as 'process'."
            )
        check_loader_arguments(dict(
            worker_type=worker_type, ray_actor_options=ray_actor_options, sync_dataset_attributes=sync_dataset_attributes,
            max_worker_restarts=max_worker_restarts, hang_timeout=hang_timeout, on_hang=on_hang,
            on_sample_error=on_sample_error, max_skipped_fraction=max_skipped_fraction,
            max_inflight_bytes=max_inflight_bytes,
        ))
        self.in_order = in_order
        self.worker_type = worker_type
        self.ray_actor_options = ray_actor_options
        # nostall's own arguments as attributes of the same names: frameworks that rebuild a
        # loader from its attributes (Lightning under DDP) carry them over.
        self.max_worker_restarts, self.hang_timeout, self.on_hang = max_worker_restarts, hang_timeout, on_hang
        self.on_sample_error, self.max_skipped_fraction = on_sample_error, max_skipped_fraction
        self.max_inflight_bytes = max_inflight_bytes
        self.sync_dataset_attributes = sync_dataset_attributes
        if auto_workers:
            self.__dict__["num_workers"] = "auto"  # `num_workers` reads the current count (see the property)
        ctx = self.multiprocessing_context or torch.multiprocessing.get_context()
        self._config = PoolConfig(
            num_workers=workers,
            prefetch_factor=as_count(self.__dict__["prefetch_factor"]) if workers else 0,
            persistent=bool(persistent_workers),
            worker_type=worker_type,
            ray_actor_options=dict(ray_actor_options) if ray_actor_options is not None else None,
            start_method=ctx.get_start_method(),
            timeout=timeout,  # as given: torch's timeout error prints it as given
            in_order=bool(in_order),
            pin_memory=bool(pin_memory),
            max_restarts=max_worker_restarts,
            hang_timeout=hang_timeout,
            on_hang=on_hang,
            on_sample_error=on_sample_error,
            max_skipped_fraction=max_skipped_fraction,
            max_inflight_bytes=max_inflight_bytes,
            auto_workers=auto_workers,
            auto_prefetch=auto_prefetch,
            sync_dataset=sync_dataset(dataset, sync_dataset_attributes),
        )
        self._ctx = ctx
        if auto_prefetch:
            self.__dict__["prefetch_factor"] = "auto"  # `prefetch_factor` reads the current one
        # torch builds a RandomSampler itself for shuffle=True; nostall may give that
        # one (and only that one) a private generator after the first epoch.
        self._nostall_builtin_sampler = sampler is None and batch_sampler is None and bool(shuffle)
        self._torch_persistent = explicit_persistent and workers > 0
        self._engine: Engine | None = None
        self._finalizer = None
        self._pending_state: dict | None = None
        self._recorder = Recorder() if stats else None
        if self._recorder is not None:
            self._stats = LoaderStats(self._recorder, num_workers=workers)
        else:
            self._stats = None

    @classmethod
    def from_config(cls, dataset, config, **overrides) -> DataLoader:
        """A loader from a configuration: a YAML file (``nostall tune`` writes one),
        a template name (``"small"``, ``"medium"``, ``"large"``) or a
        ``LoaderConfig``. ``overrides`` (e.g. ``generator``, ``collate_fn``) win."""
        from ._loader_config import loader_kwargs, resolve

        return cls(dataset, **{**loader_kwargs(resolve(config)), **overrides})

    def _start_engine(self) -> Engine:
        cfg = self._config
        pin_device = None
        if cfg.pin_memory:
            pin_device = accelerator()
            if self.pin_memory_device:
                warnings.warn(
                    "pin_memory_device is deprecated, the current accelerator will be used as the device,"
                    f"ignore pin_memory_device='{self.pin_memory_device}'.",
                    stacklevel=3,
                )
            if pin_device is None:
                _warn_pin_memory_once()
        planner = Planner(
            weakref.proxy(self),
            lookahead=cfg.persistent and cfg.num_workers > 0,
            torch_persistent=self._torch_persistent,
            dataset_in_workers=cfg.worker_type != "thread",  # "auto" starts with processes
        )
        spec = WorkSpec(
            dataset=self.dataset,
            iterable=planner.iterable,
            auto_collation=self._auto_collation,
            collate_fn=self.collate_fn,
            drop_last=self.drop_last,
            worker_init_fn=self.worker_init_fn,
            skip_errors=cfg.on_sample_error == "skip",
            watch_globals=cfg.worker_type == "auto",
            shards=_datapipes.world() if _datapipes.is_datapipe(self.dataset) else None,
        )
        engine = Engine(cfg, planner, spec, self._ctx, pin_device)
        if self._recorder is not None:
            engine.keep_spans = True  # with stats=False nothing is kept per batch
            self._recorder.workers = lambda: engine.worker_log  # not the loader: GC must still reach it
        self._finalizer = weakref.finalize(self, _release, engine, self._recorder)
        return engine

    @property
    def num_workers(self) -> int:
        """The number of workers, an int as in torch. With ``num_workers="auto"`` it is
        the number the tuner uses now (before the first epoch: the number it starts
        with); :attr:`num_workers_setting` then says ``"auto"``."""
        value = self.__dict__.get("num_workers", 0)
        if not is_auto(value):
            return value
        engine = self.__dict__.get("_engine")
        if engine is not None and engine.tuner is not None:
            return engine.tuner.workers
        return _autotune.initial_workers(local_cpu_budget(), self._config.num_workers)

    @num_workers.setter
    def num_workers(self, value) -> None:
        self.__dict__["num_workers"] = value

    @property
    def num_workers_setting(self):
        """``num_workers`` as given: ``"auto"`` or the number."""
        return self.__dict__.get("num_workers", 0)

    @property
    def prefetch_factor(self) -> int | None:
        """Batches prepared ahead per worker, an int (or None without workers) as in torch.
        With ``prefetch_factor="auto"`` it is the tuner's current value;
        :attr:`prefetch_factor_setting` then says ``"auto"``."""
        value = self.__dict__.get("prefetch_factor")
        if not is_auto(value):
            return value
        engine = self.__dict__.get("_engine")
        if engine is not None and engine.tuner is not None:
            return engine.tuner.prefetch
        return self._config.prefetch_factor

    @prefetch_factor.setter
    def prefetch_factor(self, value) -> None:
        self.__dict__["prefetch_factor"] = value

    @property
    def prefetch_factor_setting(self):
        """``prefetch_factor`` as given (after torch's default of 2 with workers): ``"auto"`` or the number."""
        return self.__dict__.get("prefetch_factor")

    def __iter__(self):
        called = _clock()
        check_generator(self.generator)
        if self._nostall_iter_error is not None:  # a new instance: one traceback per raise
            raise type(self._nostall_iter_error)(*self._nostall_iter_error.args)
        if self._engine is None:
            self._engine = self._start_engine()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._engine.load(state)
            self._nostall_sampler_epoch = getattr(self.sampler, "epoch", 0)  # set by the restore
        if self._nostall_shard_sampler is not None:  # nobody else can call its set_epoch
            self._nostall_sampler_epoch = advance_epoch(
                self._nostall_shard_sampler, self._engine.planner.epoch + 1, self._nostall_sampler_epoch
            )
        plan = self._engine.begin_epoch()
        next_fn = functools.partial(self._engine.next_batch, plan)
        if self._dataset_kind == 1 and self._IterableDataset_len_called is not None:
            next_fn = _warn_past_len(next_fn, self._IterableDataset_len_called, self.dataset, self.num_workers)
        if self._recorder is None:
            return _EpochIterator(next_fn, self._epoch_len, self._engine)
        self._recorder.begin(called, _clock())
        return _MeasuredLoaderIter(next_fn, self._recorder, self._epoch_len, self._engine)

    def _get_iterator(self):
        return iter(self)

    def _epoch_len(self) -> int:
        try:
            return len(self)
        except TypeError:
            raise TypeError("this loader's dataset has no len()") from None

    def _worker_log(self):
        return None if self._engine is None else self._engine.worker_log

    @property
    def stats(self) -> LoaderStats | None:
        """Live statistics of this loader (see :class:`nostall.LoaderStats`); None with ``stats=False``."""
        return self._stats

    def state_dict(self) -> dict:
        """Where this loader is, to continue exactly there later (the same name as
        torchdata's StatefulDataLoader). Take it between batches or between epochs;
        it is small (the epoch, how many of its batches were delivered, random
        generator states) and holds no sample. A sampler, batch sampler or dataset
        with its own ``state_dict`` is saved through it (a sampler as it was right
        after the last delivered batch was drawn); an iterable dataset is saved per
        worker (each worker's state after its last delivered batch, or how many
        batches it delivered, and the round-robin position). It is plain data
        (picklable) and versioned. See :meth:`load_state_dict`."""
        if self._pending_state is not None:  # loaded, not yet iterated: still where it says
            return dict(self._pending_state)
        state = {"version": _resume.VERSION, "loader": _resume.fingerprint(self)}
        if self._engine is None:
            return dict(state, fresh=True)
        return dict(state, **self._engine.state_dict())

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (from :meth:`state_dict`) was taken: the next
        ``iter(loader)`` yields the rest of that epoch, the same batches as the
        uninterrupted run, then the following epochs. Call it on a loader built
        like the saved one, before iterating. ``num_workers`` may differ for a
        map-style dataset; an iterable dataset is sharded by its number of workers,
        so it needs the saved one. A state that does not fit this loader raises a
        ValueError naming what differs. Map-style datasets resume without fetching
        a sample again; an iterable dataset without a ``state_dict()`` callable
        without arguments replays each worker's delivered samples, uncollated."""
        _resume.check(state, self)
        if state.get("fresh"):
            return
        self._pending_state = state

    def worker_pids(self) -> list:
        """Pids of the worker processes now running (empty before the first epoch)."""
        return [] if self._engine is None else self._engine.worker_pids()

    def close(self) -> None:
        """Stop every worker and release its resources; iterating the loader afterwards raises
        RuntimeError. A loader closed before its first ``iter()`` has no workers yet: it
        starts them if it is iterated after all (close it again when done)."""
        if self._finalizer is not None:
            self._finalizer()
        elif self._recorder is not None:
            self._recorder.close()

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ray_installed() -> bool:
    """Whether Ray can be imported, found without importing it (that takes seconds)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # sys.modules["ray"] is None: imports of it are blocked
        return False


def _release(engine: Engine, recorder: Recorder | None) -> None:
    # In a forked child (the finalizer runs there too, at exit or when the copy is
    # dropped) only the child's copies go: engine.close() leaves the parent's workers
    # alone, and the recorder's memory sampler is a thread the child does not have.
    if recorder is not None and not engine.foreign:  # first: its last memory sample still sees the workers
        recorder.close()
    engine.close()


def _warn_past_len(next_fn, length: int, dataset, num_workers: int):
    """``next_fn`` warning as torch does once an iterable dataset yields more than the
    ``len(loader)`` read before ``iter()`` (wrapped only then: no cost otherwise)."""
    yielded = 0

    def counted():
        nonlocal yielded
        batch = next_fn()
        yielded += 1
        if yielded > length:
            msg = (f"Length of IterableDataset {dataset} was reported to be {length} (when accessing "
                   f"len(dataloader)), but {yielded} samples have been fetched. ")
            if num_workers > 0:
                msg += ("For multiprocessing data-loading, this could be caused by not properly configuring "
                        "the IterableDataset replica at each worker. Please see "
                        "https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset for examples.")
            warnings.warn(msg, stacklevel=3)
        return batch

    return counted


# Under torch.profiler each next() is an event named like torch's
# ``enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__``: TensorBoard's
# profiler plugin counts events starting ``enumerate(DataLoader)#`` and ending
# ``.__next__`` as data loading.
PROFILE_NAME = "enumerate(DataLoader)#_NostallDataLoaderIter.__next__"


class _MeasuredLoaderIter(MeasuredIterator):
    """A measured epoch iterator that also names each ``next()`` for torch.profiler."""

    __slots__ = ()

    def __next__(self):
        if _profiler_enabled():
            with record_function(PROFILE_NAME):
                return MeasuredIterator.__next__(self)
        return MeasuredIterator.__next__(self)


class _EpochIterator:
    """The iterator of one epoch when statistics are off."""

    __slots__ = ("_next", "_len_fn", "_engine", "__weakref__")

    def __init__(self, next_fn, len_fn, engine=None):
        self._next = next_fn
        self._len_fn = len_fn
        self._engine = engine

    @property
    def _workers(self) -> list:
        """torch's private ``_workers``, for code that reads it (see ``_compat``)."""
        return _compat.worker_processes(self._engine)

    def __iter__(self):
        return self

    def __next__(self):
        if _profiler_enabled():  # a C flag read: the only cost without a profiler
            with record_function(PROFILE_NAME):
                return self._next()
        return self._next()

    def __len__(self) -> int:
        return self._len_fn()
