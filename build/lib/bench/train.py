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
from modeling.cuda_graphs import capture
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


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Stepper:
    """One optimiser step at a time, so modes can be timed interleaved (fair under noise).
    `autocast`: the mixed-precision dtype (Lightning's bf16-mixed: float32 weights, bf16 compute)."""

    def __init__(self, model: TaskModel, autocast: torch.dtype | None = None, foreach: bool | None = None,
                 lr: float = 1e-4, capturable: bool = False):
        self.model = model.train()
        self.device = next(model.parameters()).device
        self.autocast = autocast
        self.optimizer = torch.optim.AdamW(trainable(model), lr=lr, foreach=foreach, capturable=capturable)
        self.loss: torch.Tensor | None = None  # the last step's, before its update

    def backward(self, tokens: torch.Tensor, autocast_cache: bool = True) -> torch.Tensor:
        """Forward, loss and backward with nothing that makes the host wait for the device (no
        .item(), no boolean indexing), so a CUDA graph can capture them. Gradients must be None or
        zero before. Returns the loss."""
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None,
                            cache_enabled=autocast_cache):
            out, mask = self.model(tokens)
        losses = F.cross_entropy(out.float().transpose(1, 2), torch.zeros_like(mask, dtype=torch.long),
                                 reduction="none")
        loss = (losses * mask).sum() / mask.sum()  # the mean over real residues
        loss.backward()
        return loss.detach()

    def train(self, tokens: torch.Tensor, autocast_cache: bool = True) -> torch.Tensor:
        """One whole step (AdamW with capturable=True keeps its step counts on the device too)."""
        loss = self.backward(tokens, autocast_cache)
        self.optimizer.step()
        return loss

    def step(self, tokens: torch.Tensor) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = self.train(tokens.to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


class GraphedStepper(Stepper):
    """The same step captured once as a CUDA graph and replayed: the host queues one graph instead of
    thousands of kernels (eager steps at the 650M shape were host-bound on an H200). CUDA only; every
    batch must have the example's shape. The warm-up that capture needs leaves no trace (weights and
    optimiser state are put back), so the first replay is the first eager step."""

    def __init__(self, model: TaskModel, example: torch.Tensor, autocast: torch.dtype | None = None,
                 lr: float = 1e-4, warmup: int = 3):
        super().__init__(model, autocast, foreach=True, lr=lr, capturable=True)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.tokens = example.to(self.device).clone()  # the captured input: batches are copied in
        params = trainable(model)
        initial = [p.detach().clone() for p in params]

        def one_step() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)  # backward in the graph writes fresh gradients
            return self.train(self.tokens, autocast_cache=False)

        self.graph, self.captured_loss = capture(one_step, self.device, warmup)
        with torch.no_grad():
            for param, value in zip(params, initial):
                param.copy_(value)
            for state in self.optimizer.state.values():  # step counts and moments, in place
                for value in state.values():
                    value.zero_()

    def step(self, tokens: torch.Tensor) -> float:
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"a graphed step takes batches of shape {tuple(self.tokens.shape)}, not {tuple(tokens.shape)}")
        start = time.perf_counter()
        self.tokens.copy_(tokens)
        self.graph.replay()
        torch.cuda.synchronize(self.device)
        self.loss = self.captured_loss.clone()
        return time.perf_counter() - start


def task_model_for(encoder: nn.Module, mode: str, rank: int) -> TaskModel:
    """A fresh per-residue task model on `encoder` (modified in place), trained as `mode`: lora
    (rank `rank`), frozen (the head alone) or full."""
    if mode == "lora":
        add_lora(encoder, LoraSpec(rank=rank), encoder.shape.num_layers)
    elif mode == "full":
        encoder.requires_grad_(True)
    torch.manual_seed(0)
    return TaskModel(encoder, HeadSpec(PER_RESIDUE, 3, encoder.embed_dim)).to(next(encoder.parameters()).device)


def stepper_for(encoder: nn.Module, mode: str, rank: int, autocast: torch.dtype | None = None,
                foreach: bool | None = None) -> Stepper:
    return Stepper(task_model_for(encoder, mode, rank), autocast, foreach)


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
