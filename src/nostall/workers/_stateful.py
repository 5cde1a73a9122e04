"""Which objects keep a state nostall can save and restore (datasets, samplers).

Read by the workers (an iterable dataset's state after each batch) and by the
loader's resume bookkeeping, so it sits below both.
"""

from __future__ import annotations

import inspect


def stateful(obj) -> bool:
    """Does ``obj`` keep its own state that nostall can save: ``load_state_dict`` and a
    ``state_dict`` callable without arguments? (litdata's and MosaicML streaming's
    ``StreamingDataset.state_dict`` need arguments only their own loaders know: nostall
    never calls them, and resumes such a dataset as one without a state.)"""
    return callable(getattr(obj, "load_state_dict", None)) and takes_no_arguments(getattr(obj, "state_dict", None))


def takes_no_arguments(fn) -> bool:
    """Can ``fn`` be called as ``fn()``? False when it is not callable."""
    if not callable(fn):
        return False
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: assume the usual state_dict()
        return True
    try:
        signature.bind()
    except TypeError:
        return False
    return True
