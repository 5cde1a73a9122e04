"""KeyboardInterrupt / SystemExit raised by dataset code inside a worker (issue 12).

Before: the exception ended the worker process, which nostall took for a crash: it
restarted the worker and made the batch again (the traceback printed each time) until
the batch counted as poison, and the final error said "exited with code 1" without
naming the exception; a thread worker died and the loader waited 30 s for a hang.
torch reports "DataLoader worker (pid(s) N) exited unexpectedly". Now it is reported
once, as a RuntimeError with torch's first line for a worker's exception, naming the
exception, its message, the sample index and the worker; nothing is retried and the
epoch goes on.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import nostall

BAD = 5


class ExitsAt(torch.utils.data.Dataset):
    """Sample ``BAD`` raises ``exc`` (a KeyboardInterrupt or SystemExit), every time."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i == BAD:
            raise self.exc
        return i


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_type", ["process", "thread"])
@pytest.mark.parametrize("exc,text", [(KeyboardInterrupt("stop now"), "KeyboardInterrupt: stop now"),
                                      (SystemExit(7), "SystemExit: 7")])
def test_exit_in_getitem_reported_once(worker_type, exc, text, capfd):
    loader = nostall.DataLoader(ExitsAt(exc), batch_size=4, num_workers=2, worker_type=worker_type)
    got, errors = [], []
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        it = iter(loader)
        while True:
            try:
                got.append(next(it).tolist())
            except StopIteration:
                break
            except RuntimeError as e:
                errors.append(str(e))
        restarts = list(loader._engine.supervisor.restarts)
        loader.close()
    assert len(errors) == 1, errors
    kind = "process" if worker_type == "process" else "thread"
    name = type(exc).__name__
    first, *rest = errors[0].splitlines()
    assert first.startswith(f"Caught {name} in DataLoader worker {kind} ")  # torch's first line
    assert text in rest  # the exception and its message, from the original traceback
    assert f"batch 1 of epoch 0, sample index {BAD}" in errors[0] and "nostall worker" in errors[0]
    # Not a crash: no restart, no retry, and the epoch's other batches all arrive.
    assert restarts == []
    assert [w for w in caught_warnings if issubclass(w.category, RuntimeWarning)] == []
    assert got == [[0, 1, 2, 3], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert name not in capfd.readouterr().err  # no traceback printed by a dying worker


@pytest.mark.timeout(60)
def test_keyboard_interrupt_in_process_without_workers_is_the_loops():
    """num_workers=0: the KeyboardInterrupt is raised in the training loop's own process,
    as itself (as torch does): it is the loop's to handle."""
    loader = nostall.DataLoader(ExitsAt(KeyboardInterrupt("stop now")), batch_size=4)
    with pytest.raises(KeyboardInterrupt, match="stop now"):
        list(loader)
    with pytest.raises(KeyboardInterrupt):
        list(torch.utils.data.DataLoader(ExitsAt(KeyboardInterrupt("stop now")), batch_size=4))
