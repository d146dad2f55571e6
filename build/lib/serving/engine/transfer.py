"""Host -> device copies that do not stall the host."""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy from pageable host memory makes the host wait until the device has finished all the
    work queued before it (CUDA's rule for pageable copies); from pinned memory the copy is queued
    like a kernel and the host goes on launching."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
