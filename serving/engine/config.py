"""The engine's configuration: what `serving.serve` flags, the Serve config and the chart set."""
from __future__ import annotations

from dataclasses import dataclass

from modeling import registry as store

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("none", "int8")
LIMITS = store.ServeLimits()


def torch_dtype(name: str):
    """The torch dtype of a `dtype` option (torch is imported here: this module stays light)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: one of {sorted(DTYPES)}")
    import torch
    return getattr(torch, name)


def check_quantize(quantize: str, device: str = "cpu", dtype: str = "float32") -> None:
    """Refuse what this process cannot serve, before any model is built (ValueError says why)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize {quantize!r}: one of {list(QUANTIZE)}")
    if quantize == "none":
        return
    if device not in ("cpu", "auto"):
        raise ValueError(f"quantize=int8 runs on the CPU only (device {device!r}); on a GPU use dtype=bfloat16")
    if dtype != "float32":
        raise ValueError(f"quantize=int8 keeps activations, LoRA terms and heads in float32; dtype {dtype!r} "
                         f"cannot be combined with it")
    from serving.engine.int8 import kernel_missing
    if missing := kernel_missing():
        raise ValueError(f"quantize=int8: this CPU/torch build has no INT8 linear kernel: {missing}")


@dataclass
class EngineConfig:
    r_max: int = LIMITS.r_max
    max_device_adapters: int = 64
    # The CPU tier's bound: packed LoRA weights and heads of the adapters kept verified in host
    # memory (rank 16, float32, all six targets served: 650M ~49 MB an adapter, 8M ~2.2 MB).
    max_cpu_bytes: int = 2 * 1024**3
    max_batch_size: int = 64
    # Residues per forward pass (real tokens when packed, else padded positions). None = by device:
    # on CPU 2048 packed (bench.engine's cap sweep: +8% over 512) or int8 (its faster linears leave
    # per-pass costs to amortise: +46% over 512), 512 padded (flat from 512 up, and shorter passes
    # answer sooner); large on GPU.
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
    # Run the encoder on the batch's real tokens only (modeling/encoder.py Packing): linears, norms
    # and GELU skip the padding, attention runs per sequence; batches are bounded by real tokens.
    # None = on on the CPU (measured: bench.engine packed_over_padded), off on CUDA until a GPU run
    # has measured its varlen path (bench.gpu_check runs both); never with CUDA graphs (padded buckets).
    packed: bool | None = None
    # q and k rotated by one torch.compile'd kernel (modeling/encoder.py fused_rotate_qk); the first
    # batch pays the compile (~20 s). Off by default: measured slower on CPU, not yet on a GPU.
    fused_rotary: bool = False

    @property
    def limits(self) -> store.ServeLimits:
        return store.ServeLimits(self.r_max, tuple(self.targets))
