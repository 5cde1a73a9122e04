"""The loader and what it runs: engine, plan, schedule, delivery ledger, saved state, torch.distributed, the device hand-off."""
