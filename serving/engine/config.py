"""The engine's configuration: what `serving.serve` flags, the Serve config and the chart set."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from modeling import registry as store

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LIMITS = store.ServeLimits()


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass
class EngineConfig:
    r_max: int = LIMITS.r_max
    max_device_adapters: int = 64
    # The CPU tier's bound: packed LoRA weights and heads of the adapters kept verified in host
    # memory (a 650M rank-16 adapter is ~22 MB, an 8M one ~1 MB).
    max_cpu_bytes: int = 2 * 1024**3
    max_batch_size: int = 64
    # Padded residues per forward pass. None = by device: 512 on CPU (throughput is flat from 512
    # up there, bench/engine.py, and shorter passes answer sooner), 2048 for int8 on CPU (its faster
    # linears leave per-pass costs to amortise: +46% over 512, README), large on GPU.
    max_batch_residues: int | None = None
    targets: tuple[str, ...] = LIMITS.targets
    merged: tuple[str, ...] = ()  # adapter names always served from a merged copy
    merge_top_k: int = 0  # also merge the K adapters with the most traffic (the others' copies are freed)
    device: str = "cpu"
    return_residue_probabilities: bool = False
    # Load adapters named by queued requests in the background. None = on a GPU only: there the
    # host idles during the forward; on CPU the forward already uses every core and a concurrent
    # load slows it (bench/engine.py: cold_traffic_prefetch_speedup 0.76-0.88 on 2 cores).
    prefetch: bool | None = None
    # Weights and activations of the shared encoder, merged copies and heads. bfloat16/float16 trade
    # accuracy (tests/test_engine.py states the tolerance) for speed: tensor cores on a GPU, bf16
    # instructions on recent CPUs. Adapters stay fp32 on disk and in the CPU tier.
    dtype: str = "float32"
    # "int8": the shared encoder's linear layers (and merged copies') run W8A8 on the CPU
    # (serving/engine/int8.py); LoRA terms, heads, norms and attention stay float32. Tolerance: tests.
    quantize: str = "none"
    # Replay encoder passes from CUDA graphs, one per padded batch shape (serving/engine/graphs.py): the
    # host then queues one graph instead of thousands of kernels. CUDA only; batches are padded to
    # buckets (rows to a multiple of 8, positions to a multiple of 64).
    cuda_graphs: bool = False

    @property
    def limits(self) -> store.ServeLimits:
        return store.ServeLimits(self.r_max, tuple(self.targets))
