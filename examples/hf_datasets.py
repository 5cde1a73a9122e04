"""nostall with Hugging Face ``datasets``: a map-style data set in torch format, and an
iterable one (``to_iterable_dataset``) shuffled per epoch with ``set_epoch`` and split
over 2 nodes with ``split_dataset_by_node``. Made and saved here.

    python examples/hf_datasets.py
"""

from __future__ import annotations

import tempfile

import datasets
from datasets.distributed import split_dataset_by_node

import nostall


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        datasets.Dataset.from_dict({"idx": list(range(100)), "x": [[k / 100] * 4 for k in range(100)]}).save_to_disk(root)
        table = datasets.load_from_disk(root)

        # Map-style: batches of tensors, fetched with the dataset's __getitems__.
        with nostall.DataLoader(table.with_format("torch"), batch_size=16, shuffle=True, num_workers=2) as loader:
            for epoch in range(2):
                first = next(iter(loader))
                print(f"map-style epoch {epoch}: first batch idx {first['idx'][:6].tolist()} ...")

        # Iterable: 4 shards over the workers; set_epoch reshuffles (nostall copies it into its workers).
        stream = table.to_iterable_dataset(num_shards=4).shuffle(seed=0, buffer_size=16)
        stream = split_dataset_by_node(stream, rank=0, world_size=2).with_format("torch")  # this node's half
        with nostall.DataLoader(stream, batch_size=10, num_workers=2) as loader:
            for epoch in range(2):
                stream.set_epoch(epoch)
                seen = [int(i) for batch in loader for i in batch["idx"]]
                print(f"iterable epoch {epoch}: {len(seen)} samples of node 0, first {seen[:6]}")
            state = loader.state_dict()  # HF's state_dict() per worker: an exact mid-epoch resume
        print("saved state for", state["streams"]["num_workers"], "workers")


if __name__ == "__main__":
    main()
