"""nostall with MosaicML streaming: MDS shards written here by ``MDSWriter``, read by
``StreamingDataset`` from a local directory.

    python examples/mosaicml_streaming.py

Its ``state_dict(num_samples, from_beginning)`` takes arguments only its own loader
passes: nostall does not call it and resumes by replaying each worker's samples
(exact in epoch 0; later nostall warns, as streaming keeps its epoch in shared memory).
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch

import nostall


def import_streaming():
    """``streaming`` imports torchvision, whose PyPI wheel is a CUDA build: beside a
    CPU-only torch its C++ ops do not load and the import fails ("operator
    torchvision::nms does not exist", pytorch/vision#9085). Declaring the two operators
    it registers fake kernels for lets it import. Not needed with a matching build."""
    try:
        import streaming
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_streaming.keep = lib
        for name in [m for m in sys.modules if m.startswith(("torchvision", "streaming"))]:
            del sys.modules[name]
        import streaming
    return streaming


def main() -> None:
    streaming = import_streaming()
    with tempfile.TemporaryDirectory() as root:
        with streaming.MDSWriter(out=root, columns={"index": "int", "x": "ndarray:float32:4"},
                                 size_limit=1 << 12) as writer:
            for k in range(200):
                writer.write({"index": k, "x": np.full(4, k, dtype=np.float32)})
        dataset = streaming.StreamingDataset(local=root, batch_size=20, shuffle=True, shuffle_seed=0)
        with nostall.DataLoader(dataset, batch_size=20, num_workers=2) as loader:
            for epoch in range(2):
                seen = [int(i) for batch in loader for i in batch["index"]]
                print(f"epoch {epoch}: {len(seen)} samples, {len(set(seen))} distinct, first {seen[:5]}")
            print(loader.stats)


if __name__ == "__main__":
    main()
