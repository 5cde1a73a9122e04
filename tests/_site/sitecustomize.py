"""Test processes only: make ``import torchvision`` work beside the CPU-only torch here.

Lightning and MosaicML streaming import torchvision whenever it is installed, and the
torchvision wheel installed for the library tests is a CUDA build (see
``tests/torchvision_cpu.py``). ``tests/conftest.py`` puts this folder on PYTHONPATH, so
every process a test starts (examples, torchrun ranks, spawned workers) runs this
first. It costs nothing until something imports torchvision: only then is
``torchvision_cpu.ensure()`` called.
"""

import sys


class _EnsureTorchvision:
    """A meta-path hook that prepares torchvision's operators once, at its first import."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torchvision_cpu  # noqa: F401  (tests/ is on PYTHONPATH too)
        return None  # the normal finders import it


sys.meta_path.insert(0, _EnsureTorchvision())
