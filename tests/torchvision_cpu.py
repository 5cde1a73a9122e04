"""Make ``import torchvision`` work beside a CPU-only torch.

The torchvision wheel on PyPI (0.28.0 for torch 2.13.0) is a CUDA build: its C++ ops
library ``torchvision/_C.so`` needs ``libtorch_cuda.so``, which a CPU-only torch does not
have. torchvision then imports without its C++ ops, except that
``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms``
and ``torchvision::qnms`` unconditionally, and that fails with "operator torchvision::nms
does not exist" (pytorch/vision#9085; MosaicML streaming imports torchvision too).
``ensure()`` declares those two operators' schemas when the C++ ops cannot load, so the
import goes through; everything the tests use (``datasets.ImageFolder`` with PIL,
``transforms.v2`` on images and tensors) is pure Python and torch. The C++ ops
themselves (``torchvision.ops.nms``, ``roi_align``...) still raise torchvision's own
"Couldn't load custom C++ ops" error. On a machine where torchvision's ops load (a CUDA
torch, or torchvision's CPU wheel from PyTorch's own package index) this does nothing.

Import this module before torchvision or anything that imports it, in every process:
spawned workers import it through the dataset classes of ``library_datasets``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # kept alive: the operator definitions live as long as it does


def ensure() -> str:
    """Make torchvision importable; say how: "absent", "native" or "without C++ ops"."""
    global _library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "absent"
    if _library is not None:
        return "without C++ ops"
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
        return "native"
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        _library.define(schema)
    return "without C++ ops"


MODE = ensure()
