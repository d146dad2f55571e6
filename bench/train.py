"""Training throughput: residues/s for lora, frozen and full modes at batch 8 x 256 on the default
base, in one run (ratios are what to compare; machines here are noisy). Prints one JSON object.

  python -m bench.train [--steps 6] [--base ...]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from modeling.alphabet import tokenize
from modeling.base import load_base
from modeling.heads import HeadSpec, PER_RESIDUE
from modeling.lora import LoraSpec, add_lora
from modeling.model import TaskModel
from training.data import load_splits
from training.tasks import TASKS


def real_batches(n: int, batch: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """Windows of exactly `length` residues cut from real FLIP sec_str training sequences."""
    records = [r for r in load_splits(TASKS["sec_str"])["train"] if len(r.sequence) >= length]
    rng = random.Random(seed)
    return [tokenize([rng.choice(records).sequence[:length] for _ in range(batch)]) for _ in range(n)]


class Stepper:
    """One optimiser step at a time, so modes can be timed interleaved (fair under noise).
    `autocast`: the mixed-precision dtype (Lightning's bf16-mixed: float32 weights, bf16 compute)."""

    def __init__(self, model: TaskModel, autocast: torch.dtype | None = None, foreach: bool | None = None):
        self.model = model.train()
        self.device = next(model.parameters()).device
        self.autocast = autocast
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                           foreach=foreach)

    def step(self, tokens: torch.Tensor) -> float:
        start = time.perf_counter()
        tokens = tokens.to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out, mask = self.model(tokens)
        target = torch.zeros(int(mask.sum()), dtype=torch.long, device=self.device)
        loss = F.cross_entropy(out[mask].float(), target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def stepper_for(encoder: nn.Module, mode: str, rank: int, autocast: torch.dtype | None = None,
                foreach: bool | None = None) -> Stepper:
    """A fresh per-residue task model on `encoder` (modified in place), trained as `mode`: lora
    (rank `rank`), frozen (the head alone) or full."""
    if mode == "lora":
        add_lora(encoder, LoraSpec(rank=rank), encoder.shape.num_layers)
    elif mode == "full":
        encoder.requires_grad_(True)
    torch.manual_seed(0)
    model = TaskModel(encoder, HeadSpec(PER_RESIDUE, 3, encoder.embed_dim)).to(next(encoder.parameters()).device)
    return Stepper(model, autocast, foreach)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--base")
    args = parser.parse_args()
    batches = real_batches(args.steps + 1, args.batch, args.length)
    residues = args.batch * args.length
    result = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
              "batch": args.batch, "length": args.length, "rank": args.rank}
    steppers = {}
    for mode in ("lora", "frozen", "full"):
        base = load_base(args.base)
        steppers[mode] = stepper_for(base.encoder, mode, args.rank)
        steppers[mode].step(batches[0])  # warm-up
    times = {mode: [] for mode in steppers}
    for tokens in batches[1:]:  # interleaved: every mode sees the same batches under the same load
        for mode, stepper in steppers.items():
            times[mode].append(stepper.step(tokens))
    for mode, seconds in times.items():
        result[f"{mode}_residues_per_s"] = round(residues / statistics.median(seconds), 1)
    result["base"] = base.name
    result["lora_over_full"] = round(result["lora_residues_per_s"] / result["full_residues_per_s"], 3)
    result["frozen_over_full"] = round(result["frozen_residues_per_s"] / result["full_residues_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
