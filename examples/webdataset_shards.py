"""nostall with webdataset: tar shards made here, a pipeline split over workers, and
where ``wds.WebLoader`` was used, ``wds.FluidWrapper(nostall.DataLoader(...))``.

    python examples/webdataset_shards.py
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import webdataset as wds

import nostall


def make_shards(root: str, shards: int = 4, per_shard: int = 25) -> str:
    for s in range(shards):
        with wds.TarWriter(os.path.join(root, f"shard-{s:02d}.tar")) as sink:
            for i in range(per_shard):
                k = s * per_shard + i
                sink.write({"__key__": f"{k:06d}", "cls": str(k % 10), "npy": np.full(8, k, dtype=np.float32)})
    return os.path.join(root, "shard-{00..%02d}.tar" % (shards - 1))


class EpochPipeline(wds.DataPipeline):
    """A pipeline whose detshuffle follows the epoch set from the main process: nostall
    copies ``epoch`` into its workers and restores it at resume, so a resumed epoch
    keeps its order (a detshuffle counting epochs by itself cannot be restored)."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def iterator(self):
        for stage in self.pipeline:
            if isinstance(stage, wds.detshuffle):
                stage.epoch = self.epoch - 1  # detshuffle adds 1 as an epoch starts
        return super().iterator()


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        url = make_shards(root)
        pipeline = EpochPipeline(wds.SimpleShardList(url), wds.split_by_node, wds.split_by_worker,
                                 wds.tarfile_to_samples(), wds.detshuffle(50, seed=0), wds.decode(),
                                 wds.to_tuple("npy", "cls"), wds.batched(10))

        # Instead of wds.WebLoader(pipeline, batch_size=None, num_workers=2).unbatched().shuffle(100).batched(16):
        with nostall.DataLoader(pipeline, batch_size=None, num_workers=2) as loader:
            batches = wds.FluidWrapper(loader).unbatched().shuffle(100).batched(16)
            for epoch in range(2):
                pipeline.set_epoch(epoch)
                sizes = [len(x) for x, y in batches]
                print(f"epoch {epoch}: {len(sizes)} batches, {sum(sizes)} samples")
            print(loader.stats)


if __name__ == "__main__":
    main()
