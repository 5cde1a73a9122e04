"""``nostall.watch`` and ``nostall.progress``: the loader's statistics for any iterable
of batches (torch's DataLoader included), and a tqdm bar that shows them."""

from __future__ import annotations

import logging
import weakref
from typing import Any, Iterable, Iterator

from ._stats import LoaderStats, MeasuredIterator, Recorder, _clock


class Watched:
    """An iterable of batches, measured the way ``nostall.DataLoader`` measures itself.

    Each ``iter()`` is one epoch. ``stats`` is a live :class:`LoaderStats`;
    ``len()`` is the wrapped iterable's. The wrapper does not own what it wraps:
    ``close()`` only stops its memory sampling.
    """

    def __init__(self, iterable: Iterable, log_every: int = 0, logger: logging.Logger | None = None) -> None:
        self.iterable = iterable
        self._rec = Recorder()
        workers = getattr(iterable, "_worker_log", None)  # a nostall.DataLoader knows its workers
        if callable(workers):
            self._rec.workers = workers
        self.stats = LoaderStats(self._rec, num_workers=getattr(iterable, "num_workers", None))
        self.stats.log_every(log_every, logger)
        self._finalizer = weakref.finalize(self, self._rec.close)

    def __iter__(self) -> Iterator:
        called = _clock()
        it = iter(self.iterable)
        self._rec.begin(called, _clock())
        return MeasuredIterator(it.__next__, self._rec, self.__len__)

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop sampling memory; the figures stay readable."""
        self._finalizer()

    def __enter__(self) -> Watched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watch(iterable: Iterable, log_every: int = 0, logger: logging.Logger | None = None) -> Watched:
    """Measure any iterable of batches: ``for batch in nostall.watch(loader)``.

    Works for torch's DataLoader as for nostall's: waiting for data versus the
    loop's own work, pauses between epochs, time to first batch, samples/s and
    peak memory, in ``.stats``. ``log_every=N`` logs the "load vs train" line every
    N batches (INFO on the ``nostall`` logger, or ``logger``).
    """
    return Watched(iterable, log_every=log_every, logger=logger)


def progress(iterable: Iterable, **tqdm_kwargs: Any) -> Iterator:
    """A tqdm progress bar over one epoch of ``iterable`` that shows, live, the
    share of time the loop waits for data: ``for batch in nostall.progress(loader)``.

    ``iterable`` may be a ``nostall.DataLoader`` (its own statistics are used), a
    :class:`Watched`, or anything else (measured for this epoch). Keyword
    arguments go to ``tqdm`` (``desc``, ``leave``, ...). Needs tqdm
    (``pip install 'nostall[progress]'``).
    """
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(
            "nostall.progress needs tqdm: pip install tqdm (or pip install 'nostall[progress]')."
        ) from exc
    stats = getattr(iterable, "stats", None)
    if not isinstance(stats, LoaderStats):
        iterable = Watched(iterable)
        stats = iterable.stats
    rec = stats._rec
    if "total" not in tqdm_kwargs:
        try:
            tqdm_kwargs["total"] = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            pass
    return _bar(iterable, rec, tqdm(**tqdm_kwargs))


def _bar(iterable: Iterable, rec: Recorder, bar: Any) -> Iterator:
    shown = 0.0
    try:
        for batch in iterable:
            yield batch
            bar.update(1)
            now = _clock()
            if now - shown >= bar.mininterval:  # the bar redraws at most this often anyway
                shown = now
                bar.set_postfix_str(f"waiting for data {rec.current_waiting_fraction():.0%}", refresh=False)
        bar.set_postfix_str(f"waiting for data {rec.current_waiting_fraction():.0%}", refresh=True)
    finally:
        bar.close()
