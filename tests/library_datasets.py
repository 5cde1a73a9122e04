"""Small local data for the real libraries people feed into a DataLoader, and the
picklable pieces the tests pass to workers (see tests/test_libraries.py).

Each ``make_*`` writes a tiny data set in a directory with the library's own writer:
PNG files in class folders (torchvision), an Arrow data set on disk (Hugging Face
``datasets``), tar shards (webdataset), ``litdata.optimize`` output and MDS shards
(MosaicML streaming). Sample ``k`` always carries the value ``k``, so a test can
compare exactly which samples came and in which order.

``torchvision_cpu`` is imported first, in this process and in every spawned worker
(they import this module to unpickle the classes below before the libraries'), so
that torchvision, which MosaicML streaming imports too, imports beside a CPU-only torch.
"""

from __future__ import annotations

import os

import torchvision_cpu  # noqa: F401  (before torchvision / streaming)
import numpy as np
import torch
from torch.utils.data import get_worker_info



def importable(name: str) -> bool:
    """Does ``import name`` work here? (A library's tests are skipped only when it does not.)"""
    try:
        __import__(name)
    except ImportError:
        return False
    return True


N_IMAGES = 24  # 3 classes x 8 PNG files
N_SAMPLES = 60  # samples of the other data sets


# --------------------------------------------------------------------------- torchvision


def make_png_folders(root: str) -> str:
    """``root/images/class_c/img_k.png``: an 8x8 RGB image whose pixels all equal k."""
    from PIL import Image

    top = os.path.join(root, "images")
    for k in range(N_IMAGES):
        folder = os.path.join(top, f"class_{k % 3}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), k, dtype=np.uint8)).save(os.path.join(folder, f"img_{k:03d}.png"))
    return top


def image_folder(top: str, random: bool):
    """torchvision's ImageFolder with a transforms.v2 pipeline (random crops and flips
    when ``random``), as the subclass below so that spawned workers import this module."""
    from torchvision.transforms import v2

    steps = [v2.ToImage()]
    if random:
        steps += [v2.RandomResizedCrop(6, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps += [v2.Resize(6, antialias=True)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)]
    return __getattr__("ImageFolder")(top, transform=v2.Compose(steps))


def _image_folder_class():
    import torchvision.datasets

    class ImageFolder(torchvision.datasets.ImageFolder):
        """torchvision's ImageFolder, unchanged (defined here for spawned workers' imports)."""

    ImageFolder.__module__ = __name__
    ImageFolder.__qualname__ = "ImageFolder"
    return ImageFolder





# --------------------------------------------------------------------------- Hugging Face datasets


def make_hf(root: str) -> str:
    """An Arrow data set on disk (``save_to_disk``) with columns ``idx`` and ``x``."""
    import datasets

    ds = datasets.Dataset.from_dict({"idx": list(range(N_SAMPLES)), "x": [[float(k)] * 3 for k in range(N_SAMPLES)]})
    path = os.path.join(root, "hf")
    ds.save_to_disk(path)
    return path


# --------------------------------------------------------------------------- webdataset


def make_tar_shards(root: str, shards: int = 4) -> str:
    """``shards`` tar files of ``N_SAMPLES // shards`` samples (``cls``: k, ``npy``: [k, k]);
    returns the brace pattern of their paths."""
    import webdataset as wds

    per = N_SAMPLES // shards
    for s in range(shards):
        with wds.TarWriter(os.path.join(root, f"shard-{s:02d}.tar")) as sink:
            for i in range(per):
                k = s * per + i
                sink.write({"__key__": f"{k:06d}", "cls": str(k), "npy": np.full(2, k, dtype=np.int64)})
    return os.path.join(root, "shard-{00..%02d}.tar" % (shards - 1))


def wds_pipeline(url: str, detshuffle: bool = False):
    """A webdataset pipeline as its docs write one: shards split over nodes and workers."""
    import webdataset as wds

    stages = [wds.SimpleShardList(url), wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples()]
    if detshuffle:
        stages.append(wds.detshuffle(16, initial=4, seed=7))
    return wds.DataPipeline(*stages, wds.decode(), wds.to_tuple("cls", "npy"))


def epoch_pipeline(url: str):
    """A detshuffle pipeline whose shuffle follows the epoch set from the main process
    (``set_epoch``), which nostall copies into its workers and restores at resume."""
    return __getattr__("_EpochPipeline")(*wds_pipeline(url, detshuffle=True).pipeline)


def _epoch_pipeline_class():
    import webdataset as wds

    class EpochPipeline(wds.DataPipeline):
        """webdataset's DataPipeline whose detshuffle stage takes the epoch from ``set_epoch``."""

        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch  # a plain attribute: nostall copies it into its workers

        def iterator(self):
            for stage in self.pipeline:
                if isinstance(stage, wds.detshuffle):
                    stage.epoch = self.epoch - 1  # detshuffle adds 1 as an epoch starts
            return super().iterator()

    EpochPipeline.__module__ = __name__
    EpochPipeline.__qualname__ = "_EpochPipeline"
    return EpochPipeline





def wds_values(batch):
    """A batch of ``wds_pipeline``: the sample values and the arrays, as lists."""
    cls, npy = batch
    return [int(v) for v in cls], npy.tolist()


# --------------------------------------------------------------------------- litdata


def _litdata_sample(k: int) -> dict:
    return {"index": k, "x": np.full(3, k, dtype=np.int64)}


def make_litdata(root: str, n: int = N_SAMPLES) -> str:
    """``litdata.optimize`` output: ``n`` samples in several chunks."""
    import multiprocessing

    import litdata

    out = os.path.join(root, "litdata")
    method = multiprocessing.get_start_method(allow_none=True)
    try:
        litdata.optimize(fn=_litdata_sample, inputs=list(range(n)), output_dir=out, chunk_bytes="2KB",
                         num_workers=1, mode="overwrite")
    finally:  # optimize() sets the process-wide start method to spawn; the other tests expect theirs
        multiprocessing.set_start_method(method, force=True)
    return out


# --------------------------------------------------------------------------- MosaicML streaming


def make_mds(root: str) -> str:
    """MDS shards written by ``streaming.MDSWriter`` (``index``: k, ``x``: [k, k, k])."""
    from streaming import MDSWriter

    out = os.path.join(root, "mds")
    with MDSWriter(out=out, columns={"index": "int", "x": "ndarray:int64:3"}, size_limit=1 << 10) as writer:
        for k in range(N_SAMPLES):
            writer.write({"index": k, "x": np.full(3, k, dtype=np.int64)})
    return out


def _mds_class():
    import streaming

    class MDSDataset(streaming.StreamingDataset):
        """MosaicML streaming's StreamingDataset, unchanged (defined here for spawned workers' imports)."""

    MDSDataset.__module__ = __name__
    MDSDataset.__qualname__ = "MDSDataset"
    return MDSDataset





# --------------------------------------------------------------------------- a plain sharding dataset


class ShardByWorker(torch.utils.data.IterableDataset):
    """0..n-1 split over the workers by ``get_worker_info()``, as torch's docs show."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(w, self.n, nw))


# The library classes are made on first use (also when a spawned worker unpickles one),
# so importing this module imports no library it does not need.
_LAZY = {"ImageFolder": _image_folder_class, "_EpochPipeline": _epoch_pipeline_class, "MDSDataset": _mds_class}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in globals():
        globals()[name] = _LAZY[name]()
    return globals()[name]
