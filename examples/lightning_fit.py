"""nostall inside PyTorch Lightning's ``Trainer.fit``: a tiny model, 2 epochs, on CPU.

    python examples/lightning_fit.py                                # one process
    python -m torch.distributed.run --nproc_per_node=2 examples/lightning_fit.py   # DDP, 2 ranks

The loader is built in ``train_dataloader()``: Lightning calls it after it has
set up the process group, so under DDP nostall gives each rank its own shard
(a ``DistributedSampler``), and Lightning, seeing one, keeps nostall's loader as
it is. ``--record DIR`` writes the sample indices each rank trained on per epoch
(tests/test_trainers.py reads them); ``--stop-at E:N --checkpoint PATH`` saves a
checkpoint after N batches of epoch E and stops (a simulated crash; N = all of
them is an end-of-epoch checkpoint); ``--resume PATH`` continues from it: Lightning
saves ``loader.state_dict()`` in its checkpoints and restores it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch

import nostall


class Squares(torch.utils.data.Dataset):
    """(index, x, y) with y = sum(x**2): something a small network can learn."""

    def __init__(self, n: int = 512):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 8, generator=g)
        self.y = (self.x**2).sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return i, self.x[i], self.y[i]


class StopAt(L.Callback):
    """Save a checkpoint after ``batches`` batches of ``epoch``, then stop (a simulated crash)."""

    def __init__(self, epoch: int, batches: int, path: str):
        self.epoch, self.batches, self.path = epoch, batches, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx + 1 == self.batches:
            trainer.save_checkpoint(self.path)
            raise SystemExit(0)


class Model(L.LightningModule):
    def __init__(self, record: str | None = None):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        self.record = record
        self.seen: dict[int, list[int]] = {}
        self.loader: nostall.DataLoader | None = None

    def train_dataloader(self):
        # Built here, not before fit(): the process group exists now, so nostall shards.
        self.loader = nostall.DataLoader(Squares(), batch_size=32, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
        return self.loader

    def training_step(self, batch, batch_idx):
        index, x, y = batch
        self.seen.setdefault(self.current_epoch, []).extend(index.tolist())
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_epoch_end(self):
        print(f"rank {self.global_rank}: epoch {self.current_epoch} done, "
              f"{len(self.seen.get(self.current_epoch, []))} samples", flush=True)
        if self.record:
            path = Path(self.record) / f"rank{self.global_rank}.json"
            path.write_text(json.dumps({str(e): s for e, s in self.seen.items()}))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", help="write each rank's sample indices per epoch to this directory")
    parser.add_argument("--stop-at", metavar="E:N", help="checkpoint and stop after N batches of epoch E")
    parser.add_argument("--checkpoint", help="the checkpoint --stop-at writes")
    parser.add_argument("--resume", help="continue from this checkpoint")
    args = parser.parse_args()

    devices = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # under torchrun: one device per rank
    callbacks = []
    if args.stop_at:
        epoch, batches = (int(v) for v in args.stop_at.split(":"))
        callbacks.append(StopAt(epoch, batches, args.checkpoint))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )
    model = Model(record=args.record)
    trainer.fit(model, ckpt_path=args.resume)

    kept = trainer.train_dataloader is model.loader
    print(f"rank {trainer.global_rank}: lightning kept nostall's loader: {kept}; "
          f"sampler {type(model.loader.sampler).__name__}", flush=True)
    if trainer.global_rank == 0:
        print(model.loader.stats, flush=True)
    model.loader.close()


if __name__ == "__main__":
    main()
