"""nostall in a Hugging Face accelerate training loop: a tiny model, 2 epochs, on CPU.

    python examples/accelerate_loop.py                                # one process
    python -m torch.distributed.run --nproc_per_node=2 examples/accelerate_loop.py   # 2 ranks

Do not pass nostall's loader to ``accelerator.prepare``: prepare() builds a new
``torch.utils.data.DataLoader`` (accelerate's ``DataLoaderShard``) from the
loader's dataset and arguments, so nostall's workers, its statistics and its
sharding would be gone. Prepare the model and optimizer only, build the loader
after ``Accelerator()`` (which sets up the process group, so nostall gives each
rank its own shard) and move each batch to ``accelerator.device``.

``--record DIR`` writes the sample indices each rank trained on per epoch
(tests/test_trainers.py reads them); ``--stop-at E:N --state DIR`` saves the
training state after N batches of epoch E and stops; ``--resume DIR`` continues.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", help="write each rank's sample indices per epoch to this directory")
    parser.add_argument("--stop-at", metavar="E:N", help="save the state and stop after N batches of epoch E")
    parser.add_argument("--state", help="the directory --stop-at writes")
    parser.add_argument("--resume", help="continue from this directory")
    args = parser.parse_args()
    stop = tuple(int(v) for v in args.stop_at.split(":")) if args.stop_at else None

    accelerator = Accelerator(cpu=True)  # under torchrun / accelerate launch: the process group
    rank = accelerator.process_index
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)  # not the loader (see above)
    loader = nostall.DataLoader(Squares(), batch_size=32, shuffle=True, num_workers=2,
                                generator=torch.Generator().manual_seed(0))

    first_epoch = 0
    if args.resume:
        accelerator.load_state(args.resume)  # model and optimizer
        # nostall's state is per rank; accelerate's register_for_checkpointing would
        # save only the main process's, so each rank keeps its own file.
        saved = torch.load(Path(args.resume) / f"nostall_rank{rank}.pt", weights_only=False)
        loader.load_state_dict(saved["loader"])  # the next iter() finishes the saved epoch
        first_epoch = saved["epoch"]

    seen: dict[int, list[int]] = {}
    for epoch in range(first_epoch, 2):
        for batch_no, batch in enumerate(loader):
            index, x, y = send_to_device(batch, accelerator.device)
            seen.setdefault(epoch, []).extend(index.tolist())
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if stop == (epoch, batch_no + 1):
                accelerator.save_state(args.state)
                torch.save({"loader": loader.state_dict(), "epoch": epoch},
                           Path(args.state) / f"nostall_rank{rank}.pt")
                accelerator.wait_for_everyone()
                loader.close()
                print(f"rank {rank}: stopped after {batch_no + 1} batches of epoch {epoch}", flush=True)
                return
        print(f"rank {rank}: epoch {epoch} done, {len(seen.get(epoch, []))} samples, loss {loss.item():.4f}",
              flush=True)

    if args.record:
        (Path(args.record) / f"rank{rank}.json").write_text(json.dumps({str(e): s for e, s in seen.items()}))
    print(f"rank {rank}: sampler {type(loader.sampler).__name__}", flush=True)
    if accelerator.is_main_process:
        print(loader.stats, flush=True)
    loader.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
