"""nostall with litdata: ``litdata.optimize`` output made here, read by ``StreamingDataset``.

    python examples/litdata_streaming.py

litdata's ``StreamingDataset.state_dict`` takes arguments only litdata's own loader
passes; nostall does not call it and resumes by replaying each worker's samples
(exact in epoch 0; after it nostall warns that litdata's own epoch counter cannot be
restored unless you call ``dataset.set_epoch`` yourself each epoch, as below).
"""

from __future__ import annotations

import multiprocessing
import tempfile

import numpy as np
import litdata

import nostall


def sample(k: int) -> dict:
    return {"index": k, "features": np.full(4, k, dtype=np.float32)}


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        method = multiprocessing.get_start_method()
        litdata.optimize(fn=sample, inputs=list(range(200)), output_dir=root, chunk_bytes="8KB", num_workers=1,
                         mode="overwrite")
        multiprocessing.set_start_method(method, force=True)  # optimize() switched the whole process to spawn
        dataset = litdata.StreamingDataset(root, shuffle=True, seed=0)
        # worker_type="thread" works too: each thread worker gets its own copy of the dataset.
        with nostall.DataLoader(dataset, batch_size=20, num_workers=2) as loader:
            for epoch in range(2):
                dataset.set_epoch(epoch + 1)  # litdata counts epochs from 1
                seen = [int(i) for batch in loader for i in batch["index"]]
                print(f"epoch {epoch}: {len(seen)} samples, {len(set(seen))} distinct, first {seen[:5]}")
            print(loader.stats)


if __name__ == "__main__":
    main()
