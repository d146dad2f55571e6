"""Kernel launches per serving pass and per training step, counted on the CPU: prints one JSON object.

  python -m bench.launches [--layers 33] [--sequences 256]

On the GPU the 650M check was host-bound (bench/results/README.md): the host launches kernels
slower than the device runs them, so the number of launches, not FLOPs, sets the wall time. Each
aten operation that touches data (views excluded) is one kernel launch on a GPU, and the count
depends on the number of layers, adapters and batches, not on the width: so it is counted here, on
the CPU, at the 650M depth (33 layers, 20 heads) with a narrow width, for the same traffic as the
GPU check (256 real sequences, GPU pass sizes). A proxy that needs no GPU; the GPU check's profile
part counts the real launches.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.engine import publish_random_adapters, sequences
from bench.gpu_check import random_base
from bench.train import real_batches, stepper_for
from modeling.base import Base
from modeling.encoder import EncoderShape
from serving.engine import Engine, EngineConfig


class Launches(TorchDispatchMode):
    """Counts the aten operations that touch data (what becomes a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    # Metadata only, or a read of a host scalar (AdamW's step counts live on the host on a GPU too).
    NOT_KERNELS = ("aten._unsafe_view", "aten._local_scalar_dense")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view and not str(func).startswith(self.NOT_KERNELS)
        return func(*args, **(kwargs or {}))


def narrow_base(layers: int) -> Base:
    return random_base(EncoderShape(num_layers=layers, embed_dim=80, attention_heads=20), seed=0)


def serving_pass(base: Base, registry: Path, requests: list[tuple[str, str]], merged: tuple[str, ...] = ()) -> int:
    engine = Engine(base, registry, EngineConfig(max_batch_residues=65536, merged=merged))  # GPU pass sizes
    engine.predict(requests)  # warm: loads, slots, merged copies
    with Launches() as launches:
        engine.predict(requests)
    return launches.count


def training_step(base: Base, mode: str, tokens: torch.Tensor) -> int:
    # AdamW as it runs on a GPU: torch picks the multi-tensor (foreach) form there, a loop on the CPU.
    stepper = stepper_for(base.encoder, mode, 16, autocast=torch.bfloat16, foreach=True)
    stepper.step(tokens)  # warm: the optimiser's state
    with Launches() as launches:
        stepper.step(tokens)
    return launches.count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=33)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=64)
    args = parser.parse_args(argv)
    seqs = sequences(args.sequences, seed=0)
    out = {"layers": args.layers, "sequences": args.sequences, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "adapters"
        names = publish_random_adapters(narrow_base(args.layers), registry, args.adapters, 16)
        out["serving_merged_1"] = serving_pass(narrow_base(args.layers), registry, [(names[0], s) for s in seqs],
                                               merged=(names[0],))
        out["serving_unmerged_1"] = serving_pass(narrow_base(args.layers), registry, [(names[0], s) for s in seqs])
        out["serving_mixed"] = serving_pass(narrow_base(args.layers), registry,
                                            [(names[i % args.adapters], s) for i, s in enumerate(seqs)])
    out["adapters_mixed"] = args.adapters
    out["mixed_over_merged_launches"] = round(out["serving_mixed"] / out["serving_merged_1"], 3)
    tokens = real_batches(1, 8, 256)[0]
    for mode in ("lora", "full"):
        out[f"train_step_{mode}"] = training_step(narrow_base(args.layers), mode, tokens)
    out["lora_over_full_launches"] = round(out["train_step_lora"] / out["train_step_full"], 3)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
