"""nostall with torchvision: ``ImageFolder`` + ``transforms.v2``, on PNG files made here.

    python examples/torchvision_imagefolder.py

Random crops and flips draw from torch's RNG; nostall seeds each batch, so the
batches are the same with any num_workers (torch's depend on which worker made them).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from PIL import Image

import nostall


def import_torchvision():
    """PyPI's torchvision wheel is a CUDA build: beside a CPU-only torch its C++ ops do not
    load and ``import torchvision`` fails ("operator torchvision::nms does not exist",
    pytorch/vision#9085). Declaring the two operators it registers fake kernels for lets
    the pure-Python parts (datasets, transforms) import. Not needed with a matching build."""
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.keep = lib
        for name in [m for m in list(__import__("sys").modules) if m.startswith("torchvision")]:
            del __import__("sys").modules[name]
        import torchvision
    return torchvision


def make_images(root: str) -> str:
    for k in range(60):  # 3 classes x 20 images of 32x32 pixels
        folder = os.path.join(root, f"class_{k % 3}")
        os.makedirs(folder, exist_ok=True)
        pixels = np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{k:03d}.png"))
    return root


def main() -> None:
    torchvision = import_torchvision()
    from torchvision.transforms import v2

    transform = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(24, antialias=True), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
    with tempfile.TemporaryDirectory() as root:
        dataset = torchvision.datasets.ImageFolder(make_images(root), transform=transform)
        with nostall.DataLoader(dataset, batch_size=16, shuffle=True, num_workers=2,
                                generator=torch.Generator().manual_seed(0)) as loader:
            for epoch in range(2):
                for images, labels in loader:
                    pass
                print(f"epoch {epoch}: last batch {tuple(images.shape)}, labels {labels.tolist()}")
            print(loader.stats)


if __name__ == "__main__":
    main()
