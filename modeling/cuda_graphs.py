"""Capturing a CUDA graph the way torch requires it; shared by the serving engine's encoder passes
(serving/graphs.py) and the training-step bench (bench/train.py)."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

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
