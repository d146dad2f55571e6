"""Capturing a CUDA graph the way torch requires it, and finding on the CPU what would forbid it;
shared by the serving engine's encoder passes (serving/engine/graphs.py) and the training-step bench
(bench/train.py)."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

T = TypeVar("T")


def capture(run: Callable[[], T], device: torch.device, warmup: int, pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Calls `run` `warmup` times on a side stream (cuBLAS and attention pick their kernels there, as
    capture requires), then captures one more call; returns the graph and what that call returned
    (its static outputs, rewritten by every replay). `pool`: a memory pool shared with other graphs.
    Capture errors are thread-local: other threads may go on using the device meanwhile (the engine's
    prefetch thread copies adapters into free slots)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = run()
    return graph, output


class HostSyncs(TorchDispatchMode):
    """Records the aten operations that, on a GPU, make the host wait for the device: a value read
    back (.item(), int(), bool()) or an output whose size depends on the data (nonzero, boolean
    indexing). One of them in a training step or a serving pass forbids capturing it as a CUDA graph."""

    WAITS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero",
             "aten.equal", "aten._unique", "aten.unique", "aten.repeat_interleave")

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        if name.startswith(self.WAITS) or boolean_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))
