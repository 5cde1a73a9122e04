"""What differs between the torch versions nostall supports (torch >= 2.2), in one place."""

from __future__ import annotations

import inspect

import torch
import torch.utils.data as tud

# torch >= 2.6 takes DataLoader(in_order=...); older versions always deliver in order.
HAS_IN_ORDER = "in_order" in inspect.signature(tud.DataLoader.__init__).parameters


def has_accelerator_api() -> bool:
    """Whether this torch has ``torch.accelerator`` (torch >= 2.6)."""
    return getattr(torch, "accelerator", None) is not None


def accelerator() -> str | None:
    """The device type pinned memory is for, or None on a CPU-only machine."""
    if has_accelerator_api():
        acc = torch.accelerator
        return acc.current_accelerator().type if acc.is_available() else None
    return "cuda" if torch.cuda.is_available() else None
