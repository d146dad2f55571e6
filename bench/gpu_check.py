"""The GPU check (issue 16): correctness against the CPU, serving throughput and training speed on
a CUDA device, at the offline 8M base and a 650M-shaped base (33 layers, width 1280, 20 heads,
random weights built on the device: speed does not depend on the values). Prints one JSON object,
and rewrites it to --out after every part, so a run cut short leaves what it measured.

  python -m bench.gpu_check [--base PATH] [--out FILE] [--parts a,b] [--budget-scale 1.0]
  python -m bench.gpu_check --smoke        # every part on CPU with tiny shapes, in seconds

Every part has its own time budget and the whole run a global one (the full run: under 300 s
on an H100). A part's status is "pass" (finished, every comparison within tolerance), "fail"
(finished; it says what was out of tolerance), "incomplete" (its budget ran out: what it measured
is kept, nothing is claimed for the rest) or "error" (an exception: its message). Goals are judged
only on what was measured; a goal with no measurement is "not measured", never met.
"""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import platform
import random
import re
import statistics
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.engine import NaivePeft, both_ways, publish_random_adapters, rates, sequences, weights_bytes
from bench.train import GraphedStepper, Stepper, real_batches, stepper_for, task_model_for, trainable
from modeling.base import Base, load_base, save_hf_folder
from modeling.cuda_graphs import HostSyncs
from modeling.encoder import EncoderShape, EsmEncoder, stock_fair_esm
from modeling.heads import PER_RESIDUE, REGRESSION, SEQUENCE_CLASS
from serving.engine import Engine, EngineConfig, NoFreeSlot
from training.data import load_splits
from training.tasks import TASKS

SHAPE_650M = EncoderShape(num_layers=33, embed_dim=1280, attention_heads=20)
# Stated tolerances against the float32 CPU engine: probabilities absolute, regression values
# relative (twice the figure), labels only where the reference's top two are further apart than
# twice it. bfloat16's is the one tests/test_engine.py states for the half-precision engine.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.01}
KINDS = (PER_RESIDUE, SEQUENCE_CLASS, REGRESSION)
CORRECTNESS_RANKS = list(range(4, 17))


@dataclass
class Plan:
    """Sizes and budgets. The full plan is sized for an H100 in under 300 s; smoke is seconds on CPU."""
    device: str = "cuda"
    small: EncoderShape | None = None  # None: the base from --base (default: the offline 8M)
    large: EncoderShape = SHAPE_650M
    adapters: int = 64  # correctness: ranks 4-16, three head kinds
    requests: dict = field(default_factory=lambda: {"8M": 128, "650M": 64})
    max_residues: dict = field(default_factory=lambda: {"8M": 500, "650M": 100})  # CPU reference cost
    stress: dict = field(default_factory=lambda: {"threads": 4, "rounds": 10, "batch": 12, "slots": 16})
    traffic: int = 256  # bench.engine's traffic: real sequences of 50-500 residues
    traffic_max_residues: int = 500
    mixed: dict = field(default_factory=lambda: {"8M": (8, 64), "650M": (8, 64, 100)})
    cold_loads: int = 20  # alternating: 10 as the engine loads, 10 with the checksums first
    dtypes: tuple[str, ...] = ("bfloat16",)  # serving throughput (--dtypes float32,bfloat16 for both)
    reps: int = 3
    train: dict = field(default_factory=lambda: {"batch": 8, "length": 256, "steps": 5, "rank": 16})
    # training.fit end to end on the small base: real sec_str sequences of up to max_residues
    fit: dict = field(default_factory=lambda: {"train": 256, "eval": 64, "max_residues": 300, "steps": 40,
                                               "batch": 8, "rank": 8})
    # The default parts fit the issue's 300 s on the device: the goals' parts first; serving_8M, fit
    # and the graphed parts (measured in earlier runs, bench/results/) run when named in --parts.
    parts: tuple[str, ...] = ("environment", "correctness", "serving_650M", "stress", "training", "profile")
    budgets: dict = field(default_factory=lambda: {
        "environment": 10, "correctness": 60, "stress": 25, "serving_650M": 120, "training": 30,
        "profile": 30, "serving_8M": 50, "fit": 60, "serving_graphed": 70, "training_graphed": 60})
    overall_s: float = 285  # under 300 s with the interpreter's start


SMOKE = Plan(device="cpu", small=EncoderShape(2, 32, 4), large=EncoderShape(3, 48, 4), adapters=8,
             requests={"8M": 16, "650M": 8}, max_residues={"8M": 60, "650M": 40},
             stress={"threads": 3, "rounds": 3, "batch": 6, "slots": 3}, traffic=24, traffic_max_residues=40,
             mixed={"8M": (2, 8), "650M": (2, 8, 10)}, cold_loads=2, reps=1,
             train={"batch": 2, "length": 32, "steps": 2, "rank": 4},
             fit={"train": 16, "eval": 8, "max_residues": 40, "steps": 2, "batch": 4, "rank": 4}, overall_s=300,
             dtypes=("float32", "bfloat16"), parts=("environment", "correctness", "stress", "serving_650M", "training",
                                                   "profile", "serving_8M", "fit", "serving_graphed", "training_graphed"))


class OutOfTime(Exception):
    pass


class Clock:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def check(self, step: str) -> None:
        """Call before each step: a step that would start after the budget is not started."""
        if time.monotonic() > self.deadline:
            raise OutOfTime(step)


# ---- bases, adapters, comparisons ----------------------------------------------------------------
def random_base(shape: EncoderShape, seed: int, device: str = "cpu") -> Base:
    """A base of `shape` with random weights, built on `device` (speed does not depend on values)."""
    torch.manual_seed(seed)
    with torch.device(device):
        encoder = EsmEncoder(shape).eval().requires_grad_(False)
    return random_named(encoder, shape, seed)


def random_named(encoder: EsmEncoder, shape: EncoderShape, seed: int) -> Base:
    # Random weights: a name for the fingerprint instead of hashing 2.6 GB on every copy.
    fingerprint = hashlib.sha256(f"random {shape} seed {seed}".encode()).hexdigest()
    return Base(encoder, f"random {shape.num_layers}x{shape.embed_dim}", "random", fingerprint)


class Bases:
    """Fresh copies of the two bases on any device (an Engine moves and wraps the base it is given)."""

    def __init__(self, plan: Plan, base_spec: str | None):
        self.plan, self.base_spec = plan, base_spec
        self._large: EsmEncoder | None = None

    def get(self, size: str, device: str) -> Base:
        if size == "8M":
            if self.plan.small is None:
                return load_base(self.base_spec)
            return random_base(self.plan.small, 0, device)
        return random_named(copy.deepcopy(self.peek(size).encoder).to(device), self.plan.large, 1)

    def peek(self, size: str) -> Base:
        """The base itself, not a copy: for reading its shape and fingerprint only."""
        if size == "8M":
            return self.get(size, "cpu")
        if self._large is None:  # built once on the device, copied for each engine
            self._large = random_base(self.plan.large, 1, self.plan.device).encoder
        return random_named(self._large, self.plan.large, 1)

    def release(self) -> None:
        self._large = None


def traffic_sequences(count: int, max_residues: int, seed: int = 0) -> list[str]:
    """Real FLIP sec_str sequences (bench.engine's pool), cut to `max_residues`, sorted by length."""
    return sorted((s[:max_residues] for s in sequences(count, seed)), key=len)


def compare(expected: list, got: list, tol: float) -> dict:
    """Per-request agreement of two engines' predictions (see TOLERANCE)."""
    worst_p = worst_r = 0.0
    mismatches = errors = 0
    for want, have in zip(expected, got, strict=True):
        if isinstance(want, Exception) or isinstance(have, Exception):
            errors += 1
            continue
        bad_label = False
        if want.kind == PER_RESIDUE:
            a, b = torch.tensor(want.residue_probabilities), torch.tensor(have.residue_probabilities)
            deviation = float((a - b).abs().max())
            top2 = a.topk(2, dim=-1).values
            clear = ((top2[:, 0] - top2[:, 1]) > 2 * tol).tolist()
            bad_label = any(x != y and c for x, y, c in zip(want.labels, have.labels, clear))
            worst_p = max(worst_p, deviation)
            bad = deviation > tol
        elif want.kind == REGRESSION:
            deviation = abs(want.value - have.value) / max(1.0, abs(want.value))
            worst_r = max(worst_r, deviation)
            bad = deviation > 2 * tol
        else:
            probs = sorted(want.probabilities.values(), reverse=True)
            deviation = max(abs(want.probabilities[k] - have.probabilities[k]) for k in want.probabilities)
            bad_label = want.label != have.label and probs[0] - probs[1] > 2 * tol
            worst_p = max(worst_p, deviation)
            bad = deviation > tol
        mismatches += bad or bad_label
    return {"compared": len(expected), "mismatches": mismatches, "errors": errors, "tolerance": tol,
            "max_probability_deviation": float(f"{worst_p:.3g}"), "max_regression_relative_deviation":
            float(f"{worst_r:.3g}")}


def compare_embeddings(expected: list[torch.Tensor], got: list[torch.Tensor], tol: float = 1e-4) -> dict:
    """Per-sequence relative error (L2) of two engines' Embed answers, float32 both."""
    errors = [float((b.cpu() - a).norm() / a.norm()) for a, b in zip(expected, got, strict=True)]
    return {"compared": len(errors), "mismatches": sum(not e <= tol for e in errors), "errors": 0,
            "tolerance": tol, "max_relative_error": float(f"{max(errors):.3g}")}


def engine(bases: Bases, size: str, registry: Path, device: str, **config) -> Engine:
    config.setdefault("r_max", 16)
    return Engine(bases.get(size, device), registry, EngineConfig(device=device, **config))


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- parts ---------------------------------------------------------------------------------------
def environment(plan: Plan, bases: Bases, clock: Clock, out: dict) -> list[str]:
    clock.check("environment")
    out.update(torch=torch.__version__, python=platform.python_version(), device=plan.device,
               cpu_threads=torch.get_num_threads())
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_tf32=torch.backends.cudnn.allow_tf32)
    return []


def correctness(plan: Plan, bases: Bases, clock: Clock, out: dict) -> list[str]:
    """64 adapters of ranks 4-16 and three head kinds, mixed in every batch: the device engine in
    float32 and bfloat16, padded and packed, unmerged and merged, against the float32 CPU engine."""
    failures = []
    for size in ("8M", "650M"):
        clock.check(f"{size}: publish")
        with tempfile.TemporaryDirectory() as tmp:
            registry = Path(tmp)
            names = publish_random_adapters(bases.peek(size), registry, plan.adapters, CORRECTNESS_RANKS,
                                            prefix="c", kinds=KINDS)
            seqs = traffic_sequences(plan.requests[size], plan.max_residues[size], seed=1)
            requests = [(names[i % len(names)], s, True) for i, s in enumerate(seqs)]
            clock.check(f"{size}: CPU reference")
            start = time.perf_counter()
            cpu_engine = engine(bases, size, registry, "cpu", max_device_adapters=plan.adapters,
                                max_batch_residues=16384)
            reference = cpu_engine.predict(requests)
            result = out.setdefault(size, {"requests": len(requests), "adapters": len(names),
                                           "cpu_reference_s": round(time.perf_counter() - start, 1)})
            embedded = seqs[:16]  # Embed: the bare base's residue representations
            reference_embeddings = cpu_engine.embed(embedded)
            del cpu_engine
            free("cpu")
            merged_names = names[:len(KINDS)]  # one adapter of each head kind
            for dtype in TOLERANCE:
                clock.check(f"{size} {dtype}: packed engine")  # varlen attention and the fused rotary on CUDA
                packed = engine(bases, size, registry, plan.device, max_device_adapters=plan.adapters, dtype=dtype,
                                packed=True, fused_rotary=plan.device == "cuda" and dtype == "bfloat16")
                result[f"{dtype}_packed"] = compare(reference, packed.predict(requests), TOLERANCE[dtype])
                del packed
                clock.check(f"{size} {dtype}: device engine")
                device_engine = engine(bases, size, registry, plan.device, max_device_adapters=plan.adapters,
                                       dtype=dtype, packed=False)
                got = device_engine.predict(requests)
                result[dtype] = compare(reference, got, TOLERANCE[dtype])
                if dtype == "float32":
                    result["float32_embed"] = compare_embeddings(reference_embeddings, device_engine.embed(embedded))
                clock.check(f"{size} {dtype}: merged")
                for name in merged_names:
                    device_engine.merge(name)
                picked = [i for i, r in enumerate(requests) if r[0] in merged_names]
                merged = device_engine.predict([requests[i] for i in picked])
                result[f"{dtype}_merged_vs_unmerged"] = compare([got[i] for i in picked], merged, TOLERANCE[dtype])
                result[f"{dtype}_merged_vs_cpu"] = compare([reference[i] for i in picked], merged, TOLERANCE[dtype])
                for key in [dtype, f"{dtype}_packed", f"{dtype}_merged_vs_unmerged", f"{dtype}_merged_vs_cpu"] + (
                        ["float32_embed"] if dtype == "float32" else []):
                    wrong = result[key]["mismatches"] + result[key]["errors"]
                    out["wrong_answers"] = out.get("wrong_answers", 0) + wrong
                    if wrong:
                        failures.append(f"{size} {key}: {result[key]['mismatches']} mismatches, "
                                        f"{result[key]['errors']} errors")
                del device_engine
                free(plan.device)
    return failures


def stress(plan: Plan, bases: Bases, clock: Clock, out: dict, **config) -> list[str]:
    """Fewer device slots than adapters; several threads submit mixed batches while the adapters of
    their next batch are prefetched through the side stream and others are evicted. Every answer
    is compared with the float32 CPU engine's. `config`: more options for the device engine."""
    s = plan.stress
    clock.check("publish")
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp)
        names = publish_random_adapters(bases.peek("8M"), registry, plan.adapters, CORRECTNESS_RANKS,
                                        prefix="s", kinds=KINDS)
        seqs = traffic_sequences(plan.requests["8M"], plan.max_residues["8M"], seed=2)
        pairs = [(names[i % len(names)], seq, True) for i, seq in enumerate(seqs)]
        clock.check("CPU reference")
        reference = engine(bases, "8M", registry, "cpu", max_device_adapters=plan.adapters,
                           max_batch_residues=16384).predict(pairs)
        clock.check("device engine")
        config.setdefault("packed", not config.get("cuda_graphs"))  # the packed engine, unless replaying graphs
        device_engine = engine(bases, "8M", registry, plan.device, max_device_adapters=s["slots"], prefetch=True,
                               **config)
        counts = {"requests": 0, "mismatches": 0, "errors": 0, "retries": 0, "prefetches": 0}
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            batches = [rng.sample(range(len(pairs)), s["batch"]) for _ in range(s["rounds"])]
            for i, batch in enumerate(batches):
                clock.check(f"client {seed} round {i}")
                if i + 1 < len(batches):  # the next batch's adapters load while this one runs
                    started = sum(device_engine.prefetch(pairs[j][0]) is not None for j in batches[i + 1])
                    with lock:
                        counts["prefetches"] += started
                todo = list(batch)
                while todo:  # NoFreeSlot (every slot held by running batches) asks for a retry
                    results = device_engine.predict([pairs[j] for j in todo])
                    retry = [j for j, r in zip(todo, results) if isinstance(r, NoFreeSlot)]
                    done = [(j, r) for j, r in zip(todo, results) if not isinstance(r, NoFreeSlot)]
                    check = compare([reference[j] for j, _ in done], [r for _, r in done], TOLERANCE["float32"])
                    with lock:
                        counts["requests"] += len(done)
                        counts["mismatches"] += check["mismatches"]
                        counts["errors"] += check["errors"]
                        counts["retries"] += len(retry)
                    todo = retry
                    if todo:
                        clock.check(f"client {seed} round {i}: retry")
                        time.sleep(0.001 * rng.random())

        with ThreadPoolExecutor(s["threads"]) as pool:
            for future in [pool.submit(client, seed) for seed in range(s["threads"])]:
                future.result()
        out.update(counts, adapters=len(names), device_slots=s["slots"], threads=s["threads"],
                   evictions=device_engine.slots.evictions, loads=device_engine.stats["loads"])
    failures = []
    out["wrong_answers"] = counts["mismatches"] + counts["errors"]
    if out["wrong_answers"]:
        failures.append(f"{counts['mismatches']} mismatches, {counts['errors']} errors")
    if not device_engine.slots.evictions:
        failures.append("no eviction happened: not a stress")
    return failures


def timed(engine_: Engine, requests: list[tuple[str, str]], reps: int) -> dict:
    """Median of `reps` passes after a warm-up pass (every batch shape once, every adapter loaded)."""
    samples = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        results = engine_.predict(requests)
        if rep:
            samples.append(time.perf_counter() - start)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors[0]
    return rates(requests, statistics.median(samples))


# NVIDIA's data sheets: dense bfloat16 tensor-core peak (SXM parts), TFLOP/s
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for chip, peak in PEAK_BF16_TFLOPS.items() if chip in name), None)


def flop_per_residue(shape: EncoderShape, seqs: list[str]) -> float:
    """Useful forward FLOPs per residue over these sequences (each with its BOS and EOS): the six
    linears, 24 E^2 per token per layer, and attention's two matmuls, 4 E n per token (n: its own
    sequence's tokens). Norms, rotary and heads are left out, padding is not useful work."""
    e, layers = shape.embed_dim, shape.num_layers
    flops = sum((len(s) + 2) * layers * (24 * e * e + 4 * e * (len(s) + 2)) for s in seqs)
    return flops / sum(map(len, seqs))


def online(engine_: Engine, requests: list[tuple[str, str]], per_call: int) -> dict:
    """Arrival order, `per_call` requests a call (an online service's small batches), after a warm pass."""
    engine_.predict(requests)
    sync(str(engine_.device.type))
    start = time.perf_counter()
    for i in range(0, len(requests), per_call):
        engine_.predict(requests[i:i + per_call])
    return rates(requests, time.perf_counter() - start)


def serving(size: str):
    def part(plan: Plan, bases: Bases, clock: Clock, out: dict) -> list[str]:
        """bench.engine's traffic on the device, per dtype, on the engine padded and packed (packed
        with the fused rotary on CUDA): one adapter unmerged and merged, 8/64(/100) adapters mixed in
        every batch, and online traffic (arrival order, 8 requests a call). Beside them, the peers
        on the same sequences and weights: peft's mixed-adapter batches (`adapter_names=`) on
        transformers' EsmModel, EsmModel holding the merged adapter, and a peft set_adapter loop on
        fair-esm. MFU = residues/s x useful FLOPs per residue / the chip's dense bf16 peak."""
        from bench.hf_peers import HfPeftMixed, hf_esm, hf_serve

        mixed = plan.mixed[size]
        clock.check("publish")
        with tempfile.TemporaryDirectory() as tmp:
            registry = Path(tmp)
            start = time.perf_counter()
            names = publish_random_adapters(bases.peek(size), registry, max(mixed) + plan.cold_loads, 16)
            out["publish_s"] = round(time.perf_counter() - start, 1)
            warm, cold = names[:max(mixed)], names[max(mixed):]
            seqs = traffic_sequences(plan.traffic, plan.traffic_max_residues)
            flop = flop_per_residue(bases.peek(size).encoder.shape, seqs)
            peak = peak_tflops(plan.device)
            out.update(sequences=len(seqs), residues=sum(map(len, seqs)), rank=16, flop_per_residue=round(flop),
                       peak_bf16_tflops=peak)
            one = [(warm[0], s) for s in seqs]
            traffic = {k: [(warm[i % k], s) for i, s in enumerate(seqs)] for k in mixed}
            k64 = mixed[1]
            arrivals = [(warm[i % k64], s) for i, s in enumerate(random.Random(3).sample(seqs, len(seqs)))]

            def mfu(rate: dict) -> float | None:
                return None if peak is None else round(rate["residues_per_s"] * flop / (peak * 1e12), 4)

            for dtype in plan.dtypes:
                result = out.setdefault(dtype, {})
                variants = {"padded": dict(packed=False), "packed": dict(packed=True, fused_rotary=plan.device == "cuda")}
                for label, options in variants.items():
                    measured = result.setdefault(label, {})
                    clock.check(f"{dtype} {label}: engine")
                    if plan.device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    device_engine = engine(bases, size, registry, plan.device, max_device_adapters=max(mixed),
                                           max_batch_size=64, dtype=dtype, **options)
                    measured["unmerged_1"] = timed(device_engine, one, plan.reps)
                    for k in mixed:
                        clock.check(f"{dtype} {label}: mixed {k}")
                        measured[f"mixed_{k}"] = timed(device_engine, traffic[k], plan.reps)
                    stats = device_engine.stats
                    measured["padding_fraction"] = round(1 - stats["tokens"] / stats["positions"], 3)
                    clock.check(f"{dtype} {label}: online")
                    measured[f"online_8_mixed_{k64}"] = online(device_engine, arrivals, 8)
                    clock.check(f"{dtype} {label}: merged")
                    device_engine.merge(warm[0])
                    measured["merged_1"] = timed(device_engine, one, plan.reps)
                    for key in ("merged_1", f"mixed_{k64}", f"online_8_mixed_{k64}"):
                        measured[key]["mfu"] = mfu(measured[key])
                    if plan.device == "cuda":
                        measured["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    if label == "packed":
                        clock.check(f"{dtype}: cold loads")
                        result.update(cold_loads(device_engine, cold))
                        if dtype == "bfloat16" and size == "650M":
                            result["slot_capacity"] = slot_capacity(device_engine, plan.device)
                        merged_adapter = device_engine.load(warm[0])  # for the EsmModel peer
                        merged_encoder = device_engine.merged_encoder(merged_adapter)
                    del device_engine
                    free(plan.device)
                torch_dtype = getattr(torch, dtype)
                clock.check(f"{dtype}: transformers EsmModel")
                model = hf_esm(merged_encoder, plan.device, torch_dtype)
                del merged_encoder
                head = merged_adapter.head.to(plan.device, torch_dtype)
                hf_serve(model, head, seqs[:8], 64)  # warm-up
                result["transformers_esm_merged_1"] = hf_serve(model, head, seqs, 64)
                del model
                free(plan.device)
                clock.check(f"{dtype}: peft adapter_names")
                peer = HfPeftMixed(hf_esm(bases.get(size, plan.device).encoder, plan.device, torch_dtype),
                                   registry, warm[:k64])
                peer.serve(traffic[k64][:8], 64)  # warm-up
                result[f"peft_mixed_batch_{k64}"] = peer.serve(traffic[k64], 64)
                del peer
                free(plan.device)
                clock.check(f"{dtype}: naive peft")
                with torch.device(plan.device):
                    model = stock_fair_esm(bases.get(size, plan.device).encoder)
                naive = NaivePeft(model, registry, warm[:k64]).to(plan.device, torch_dtype)
                naive.serve(traffic[k64][:8], 64)  # warm-up
                result[f"naive_peft_{k64}"] = naive.serve(traffic[k64], 64)
                del naive, model
                free(plan.device)
                result.update(serving_ratios(result, mixed))
        return []
    return part


def serving_ratios(result: dict, mixed: tuple[int, ...]) -> dict:
    """The issue's ratios, from one dtype's measurements (serving part)."""
    k64, packed, padded = mixed[1], result["packed"], result["padded"]

    def ratio(a: dict, b: dict) -> float:
        return round(a["residues_per_s"] / b["residues_per_s"], 3)

    out = {f"mixed{k64}_over_merged": ratio(packed[f"mixed_{k64}"], packed["merged_1"]),
           "over_transformers_esm": ratio(packed["merged_1"], result["transformers_esm_merged_1"]),
           "over_peft_mixed_batch": ratio(packed[f"mixed_{k64}"], result[f"peft_mixed_batch_{k64}"]),
           f"mixed{k64}_over_naive": ratio(packed[f"mixed_{k64}"], result[f"naive_peft_{k64}"]),
           "merged_residues_per_s": packed["merged_1"]["residues_per_s"],
           "padded_engine": {f"mixed{k64}_over_merged": ratio(padded[f"mixed_{k64}"], padded["merged_1"]),
                      "over_transformers_esm": ratio(padded["merged_1"], result["transformers_esm_merged_1"])}}
    out["packed_over_padded"] = {key: ratio(packed[key], padded[key])
                                 for key in ("merged_1", f"mixed_{k64}", f"online_8_mixed_{k64}")}
    for k in mixed[2:]:
        out[f"mixed{k}_over_merged"] = ratio(packed[f"mixed_{k}"], packed["merged_1"])
    return out


def slot_bytes(device_engine: Engine) -> int:
    """What one device slot holds: A, B and bias of every wrapped linear at r_max, in the engine's dtype."""
    return device_engine.slot_store.slot_bytes


def cold_loads(device_engine: Engine, names: list[str]) -> dict:
    """Disk -> verified CPU tensors (checksums included) -> a usable device slot, per adapter never
    seen before (adapter_read_ms: its disk -> verified, packed CPU tier part), with the checksums
    beside the parsing as the engine does; every other load computes them first, for comparison
    (bench.cold_load); and what a slot holds against the adapter's own float32 weights."""
    ways = both_ways(device_engine, names)
    loads = ways["overlapped"]
    per_slot = slot_bytes(device_engine)
    weights = weights_bytes(device_engine, names[0])
    return {"adapter_load_ms": round(statistics.median(loads["total"]), 2),
            "adapter_load_ms_max": round(max(loads["total"]), 2),
            "adapter_read_ms": round(statistics.median(loads["read"]), 2),
            "adapter_load_ms_checksums_first": round(statistics.median(ways["sequential"]["total"]), 2),
            "device_slot_mb": round(per_slot / 2**20, 3), "adapter_weights_mb": round(weights / 2**20, 3),
            "device_slot_over_weights": round(per_slot / weights, 3)}


def slot_capacity(device_engine: Engine, device: str) -> dict:
    """How many rank-16 device slots fit beside the base and the activations of the traffic just
    served: the free memory over one slot's bytes."""
    if device != "cuda":
        return {"note": "measured on CUDA only"}
    per_slot = slot_bytes(device_engine)
    total = torch.cuda.get_device_properties(0).total_memory
    activations = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    headroom = 2 * 2**30
    free_bytes = total - torch.cuda.memory_allocated() - activations - headroom
    slots = len(device_engine.slots.free) + len(device_engine.slots.slot_of)
    return {"rank16_adapters": slots + int(free_bytes // per_slot), "slot_mb": round(per_slot / 2**20, 3),
            "activation_peak_gb": round(activations / 2**30, 2), "headroom_gb": 2}


def train_model(plan: Plan, bases: Bases, mode: str) -> Stepper:
    """A fresh 650M-shaped task model for `mode` (lora r16 or full), bf16 mixed precision."""
    bases.release()
    free(plan.device)
    return stepper_for(bases.get("650M", plan.device).encoder, mode, plan.train["rank"], autocast=torch.bfloat16)


def training(plan: Plan, bases: Bases, clock: Clock, out: dict) -> list[str]:
    """LoRA against full fine-tuning at the 650M shape, bf16 mixed precision, real sequences: at the
    issue's batch (8 x 256) and, to show where the balance lies, at four times the batch."""
    t = plan.train
    sizes = {"": t["batch"], f"_batch{4 * t['batch']}": 4 * t["batch"]}
    batches = {key: real_batches(t["steps"] + 2, batch, t["length"]) for key, batch in sizes.items()}
    out.update(batch=t["batch"], length=t["length"], rank=t["rank"], precision="bf16-mixed",
               shape=bases.plan.large.as_dict())
    for mode in ("lora", "full"):
        clock.check(mode)
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stepper = train_model(plan, bases, mode)
        out[f"{mode}_trainable_parameters"] = sum(p.numel() for p in trainable(stepper.model))
        for key, batch in sizes.items():
            for tokens in batches[key][:2]:  # warm-up
                stepper.step(tokens)
            seconds = []
            for i, tokens in enumerate(batches[key][2:]):
                clock.check(f"{mode}{key} step {i}")
                seconds.append(stepper.step(tokens))
            out[f"{mode}{key}_residues_per_s"] = round(batch * t["length"] / statistics.median(seconds), 1)
            if plan.device == "cuda" and not key:
                out[f"{mode}_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del stepper
    for key in sizes:
        out[f"lora_over_full{key}"] = round(out[f"lora{key}_residues_per_s"] / out[f"full{key}_residues_per_s"], 3)
    bases.release()
    return []


def serving_graphed(plan: Plan, bases: Bases, clock: Clock, out: dict) -> list[str]:
    """The engine replaying its encoder passes from CUDA graphs (EngineConfig.cuda_graphs,
    serving/engine/graphs.py) against the same engine eager, bfloat16, on bench.engine's traffic: first the
    answers (bf16 tolerance: padding a batch to its graph's bucket may change which kernels run),
    then one adapter merged and 64 mixed, each way. On the CPU (smoke) both engines run eager, so
    the part's code runs and nothing is claimed. First of all, the stress part with graphs."""
    graphs = plan.device == "cuda"
    out["graphs"] = graphs
    # The stress part again, graphed: captures while other threads prefetch into free slots.
    failures = [f"stress: {failure}" for failure in stress(plan, bases, clock, out.setdefault("stress", {}),
                                                            cuda_graphs=graphs)]
    out["wrong_answers"] = out["stress"]["wrong_answers"]
    for size in ("650M", "8M"):
        k = plan.mixed[size][1]
        clock.check(f"{size}: publish")
        with tempfile.TemporaryDirectory() as tmp:
            registry = Path(tmp)
            names = publish_random_adapters(bases.peek(size), registry, k, 16)
            seqs = traffic_sequences(plan.traffic, plan.traffic_max_residues)
            one, mixed = [(names[0], s) for s in seqs], [(names[i % k], s) for i, s in enumerate(seqs)]
            result = out.setdefault(size, {"adapters": k, "sequences": len(seqs)})
            answers = {}
            for label, use_graphs in (("eager", False), ("graphed", graphs)):
                clock.check(f"{size}: {label}")
                device_engine = engine(bases, size, registry, plan.device, max_device_adapters=k, max_batch_size=64,
                                       dtype="bfloat16", cuda_graphs=use_graphs)
                answers[label] = device_engine.predict([(name, s, True) for name, s in mixed])
                result[f"{label}_mixed_{k}"] = timed(device_engine, mixed, plan.reps)
                clock.check(f"{size}: {label} merged")
                device_engine.merge(names[0])
                result[f"{label}_merged_1"] = timed(device_engine, one, plan.reps)
                if device_engine.graphs is not None:
                    result.update(captures=device_engine.graphs.captures,
                                  capture_s=round(device_engine.graphs.capture_s, 2))
                del device_engine
                free(plan.device)
            result["graphed_vs_eager"] = compare(answers["eager"], answers["graphed"], TOLERANCE["bfloat16"])
            wrong = result["graphed_vs_eager"]["mismatches"] + result["graphed_vs_eager"]["errors"]
            out["wrong_answers"] += wrong
            if wrong:
                failures.append(f"{size}: {wrong} graphed answers differ from eager ones")
            def ratio(a: str, b: str) -> float:
                return round(result[a]["residues_per_s"] / result[b]["residues_per_s"], 3)

            for label in ("eager", "graphed"):
                result[f"mixed{k}_over_merged_{label}"] = ratio(f"{label}_mixed_{k}", f"{label}_merged_1")
            for traffic in (f"mixed_{k}", "merged_1"):
                result[f"graphed_over_eager_{traffic}"] = ratio(f"graphed_{traffic}", f"eager_{traffic}")
    return failures


def training_graphed(plan: Plan, bases: Bases, clock: Clock, out: dict) -> list[str]:
    """Training steps captured as CUDA graphs (bench.train.GraphedStepper): what LoRA and full
    fine-tuning cost once the host no longer launches every kernel (`training` found both host-bound).
    First the precondition, on the small base: no step makes the host wait for the device. Then, on
    CUDA, the capture against eager steps from the same weights (float32, dropout off, a large
    learning rate so that a missed update shows), within ten times what two eager runs differ by
    (or 1e-4), and speed at the 650M shape as in `training`."""
    t = plan.train
    failures = []
    small = bases.get("8M", plan.device).encoder.to(plan.device)
    tokens = real_batches(1, t["batch"], t["length"])[0].to(plan.device)
    for mode in ("lora", "full"):
        clock.check(f"host syncs {mode}")
        stepper = stepper_for(copy.deepcopy(small), mode, t["rank"], autocast=torch.bfloat16)
        with HostSyncs() as syncs:
            stepper.backward(tokens)
        out[f"{mode}_host_syncs"] = len(syncs.found)
        if syncs.found:
            failures.append(f"{mode}: the step makes the host wait at {sorted(set(syncs.found))}")
    if plan.device != "cuda":
        out["graphs"] = "not run: CUDA graphs need a CUDA device"
        return failures
    batches = real_batches(3, t["batch"], t["length"], seed=1)
    for mode in ("lora", "full"):
        clock.check(f"graph against eager {mode}")
        model = task_model_for(copy.deepcopy(small), mode, t["rank"])
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        initial = [p.detach().clone() for p in trainable(model)]
        # Two eager runs give the noise floor (backward kernels that add with atomics need not
        # repeat bit for bit, and AdamW turns a flipped sign of a near-zero gradient into a whole
        # step); the eager runs use the graphed run's optimiser settings (capturable AdamW).
        runs = {"eager": Stepper(copy.deepcopy(model), foreach=True, lr=1e-2, capturable=True),
                "eager_again": Stepper(copy.deepcopy(model), foreach=True, lr=1e-2, capturable=True),
                "graphed": GraphedStepper(copy.deepcopy(model), batches[0], lr=1e-2)}
        losses = {name: [] for name in runs}
        for batch in batches:
            for name, stepper in runs.items():
                stepper.step(batch)
                losses[name].append(float(stepper.loss))
        final = {name: trainable(stepper.model) for name, stepper in runs.items()}

        def apart(a: str, b: str) -> dict:
            weights = max((x - y).abs().max().item() for x, y in zip(final[a], final[b]))
            loss = max(abs(x - y) for x, y in zip(losses[a], losses[b])) / abs(losses[a][0])
            return {"weights_max_abs": weights, "loss_over_first_loss": loss}

        moved = max((a - b).abs().max().item() for a, b in zip(initial, final["graphed"]))
        graphed, floor = apart("eager", "graphed"), apart("eager", "eager_again")
        out[f"{mode}_graph_vs_eager"] = {"losses": losses, **graphed, "eager_vs_eager": floor,
                                         "weights_moved_max_abs": moved}
        if not (graphed["loss_over_first_loss"] <= max(1e-4, 10 * floor["loss_over_first_loss"])
                and graphed["weights_max_abs"] <= max(1e-4, 10 * floor["weights_max_abs"]) and moved > 1e-3):
            failures.append(f"{mode}: graphed steps differ from eager ones (loss {graphed['loss_over_first_loss']:.2e}, "
                            f"weights {graphed['weights_max_abs']:.2e}; eager twice: loss "
                            f"{floor['loss_over_first_loss']:.2e}, weights {floor['weights_max_abs']:.2e}; moved {moved:.2e})")
        del runs, model
    batches = real_batches(t["steps"] + 1, t["batch"], t["length"])
    out.update(batch=t["batch"], length=t["length"], rank=t["rank"], precision="bf16-mixed")
    for mode in ("lora", "full"):
        clock.check(f"graphed {mode}")
        bases.release()
        free(plan.device)
        torch.cuda.reset_peak_memory_stats()
        model = task_model_for(bases.get("650M", plan.device).encoder, mode, t["rank"])
        stepper = GraphedStepper(model, batches[0], autocast=torch.bfloat16)
        seconds = []
        for i, batch in enumerate(batches[1:]):
            clock.check(f"graphed {mode} step {i}")
            seconds.append(stepper.step(batch))
        out[f"{mode}_graphed_residues_per_s"] = round(t["batch"] * t["length"] / statistics.median(seconds), 1)
        out[f"{mode}_graphed_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del stepper, model
    out["lora_over_full_graphed"] = round(out["lora_graphed_residues_per_s"] / out["full_graphed_residues_per_s"], 3)
    bases.release()
    return failures


def fit_end_to_end(plan: Plan, bases: Bases, clock: Clock, out: dict) -> list[str]:
    """The product's own commands on the device, small base: `training.fit` (Lightning, bf16-mixed on
    CUDA) trains a LoRA adapter on real sec_str sequences, scores it where it trained and publishes
    it; `training.evaluate` scores it again on the CPU; the engine serves it on the device and on the
    CPU (float32)."""
    from training import evaluate, fit
    from training.run import run

    f = plan.fit
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clock.check("data")
        base_spec = bases.base_spec
        if plan.small is not None:  # the smoke's random base, on disk for the command line
            base_spec = str(save_hf_folder(bases.get("8M", "cpu").encoder, tmp / "base"))
        base_args = ["--base", base_spec] if base_spec else []
        records = [r for r in load_splits(TASKS["sec_str"])["train"] if len(r.sequence) <= f["max_residues"]]
        random.Random(0).shuffle(records)
        cuts = {"train": (0, f["train"]), "val": (f["train"], f["train"] + f["eval"]),
                "test": (f["train"] + f["eval"], f["train"] + 2 * f["eval"])}
        files = {}
        for split, (low, high) in cuts.items():
            files[split] = tmp / f"{split}.csv"
            files[split].write_text("id,sequence,3state,resolved\n" + "".join(
                f"s{i},{r.sequence},{r.label},{r.mask or '1' * len(r.sequence)}\n" for i, r in enumerate(records[low:high])))
        clock.check("training.fit")
        precision = "bf16-mixed" if plan.device == "cuda" else "32-true"
        summary = run(fit.parse_args([
            *base_args, "--task", "sec_str", *(a for split, path in files.items() for a in (f"--{split}", str(path))),
            "--registry", str(tmp / "registry"), "--run-dir", str(tmp / "runs"), "--name", "fit-check",
            "--rank", str(f["rank"]), "--max-steps", str(f["steps"]), "--batch-size", str(f["batch"]),
            "--precision", precision]))
        out["fit"] = {k: summary[k] for k in ("scored_on", "train_seconds", "trainable_parameters", "val_q3", "test_q3")}
        out["fit"]["precision"] = precision
        if not summary["scored_on"].startswith(plan.device):
            failures.append(f"training.fit scored on {summary['scored_on']}, not where it trained ({plan.device})")
        clock.check("training.evaluate")
        folder = summary["published"]
        out["evaluate_q3"] = {device: evaluate.evaluate(folder, files["test"], device=device)["q3"]
                              for device in dict.fromkeys(("cpu", plan.device))}
        for device, q3 in out["evaluate_q3"].items():
            if abs(q3 - summary["test_q3"]) > 0.01:  # float32 on either side; a near-tie may flip a residue
                failures.append(f"test q3 {summary['test_q3']} from training.fit, {q3} from evaluate on {device}")
        clock.check("serve")
        requests = [("fit-check", r.sequence, True) for r in records[cuts["test"][0]:cuts["test"][1]]]
        reference, served = (Engine(load_base(base_spec), tmp / "registry", EngineConfig(device=device)).predict(requests)
                             for device in ("cpu", plan.device))
        out["served_device_vs_cpu"] = compare(reference, served, TOLERANCE["float32"])
        out["wrong_answers"] = out["served_device_vs_cpu"]["mismatches"] + out["served_device_vs_cpu"]["errors"]
        if out["wrong_answers"]:
            failures.append(f"the trained adapter served on {plan.device}: {out['served_device_vs_cpu']}")
    return failures


def profile(plan: Plan, bases: Bases, clock: Clock, out: dict) -> list[str]:
    """Where the time goes at the 650M shape: one bfloat16 serving pass (packed, fused rotary) of the
    merged adapter and of 64 adapters mixed, and one training step of LoRA and of full fine-tuning. Device time over wall
    time well under 1 says the host, not the device, is the limit."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device == "cuda" else [])

    def trace(label: str, run) -> None:
        clock.check(label)
        run()  # warm-up
        with torch_profile(activities=activities) as prof:
            start = time.perf_counter()
            run()
            sync(plan.device)
            wall = time.perf_counter() - start
        out[label] = kernel_summary(prof.events(), wall)

    k64 = plan.mixed["650M"][1]
    clock.check("publish")
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp)
        names = publish_random_adapters(bases.peek("650M"), registry, k64, 16)
        seqs = traffic_sequences(plan.traffic, plan.traffic_max_residues)
        clock.check("engine")
        device_engine = engine(bases, "650M", registry, plan.device, max_device_adapters=k64, max_batch_size=64,
                               dtype="bfloat16", merged=(names[0],), packed=True, fused_rotary=plan.device == "cuda")
        trace("merged_1", lambda: device_engine.predict([(names[0], s) for s in seqs]))
        trace(f"mixed_{k64}", lambda: device_engine.predict([(names[1 + i % (k64 - 1)], s) for i, s in enumerate(seqs)]))
        device_engine = None  # noqa: F841 (freed before the training models are built)
    free(plan.device)
    t = plan.train
    tokens = real_batches(1, t["batch"], t["length"])[0]
    for mode in ("lora", "full"):
        clock.check(f"train {mode}")
        stepper = train_model(plan, bases, mode)
        stepper.step(tokens)
        trace(f"train_step_{mode}", lambda: stepper.step(tokens))
        stepper = None  # noqa: F841
    bases.release()
    return []


def kernel_summary(events, wall: float) -> dict:
    """Device kernels from a profiler trace: busy time (summed durations) over wall time, launches,
    and the kernels with the most device time."""
    from torch.autograd import DeviceType

    by_name: dict[str, list] = {}
    for event in events:
        if event.device_type == DeviceType.CUDA:
            entry = by_name.setdefault(event.name[:90], [0.0, 0])
            entry[0] += event.time_range.elapsed_us() / 1000
            entry[1] += 1
    busy = sum(ms for ms, _ in by_name.values())
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:10]
    return {"wall_ms": round(wall * 1000, 1), "device_busy_ms": round(busy, 1),
            "device_busy_over_wall": round(busy / 1000 / wall, 3), "launches": sum(n for _, n in by_name.values()),
            "top_kernels_ms": [[name, round(ms, 2), n] for name, (ms, n) in top]}


PARTS = {"environment": environment, "correctness": correctness, "stress": stress,
         "serving_650M": serving("650M"), "training": training, "profile": profile, "serving_8M": serving("8M"),
         "fit": fit_end_to_end,
         # last: a capture that goes wrong can leave the device unusable for what follows
         "serving_graphed": serving_graphed, "training_graphed": training_graphed}


# ---- goals and the run ---------------------------------------------------------------------------
def goals(report: dict) -> dict:
    """The issues' goals on the device (650M shape, bfloat16), for the parts that ran; judged only
    on what was measured."""
    parts = report["parts"]
    bf16 = parts.get("serving_650M", {}).get("bfloat16", {})
    graphed = parts.get("serving_graphed", {})
    checked = [parts.get(p, {}) for p in ("correctness", "stress")]
    finished = all(part.get("status") in ("pass", "fail") for part in checked)
    measured = {  # name: (part, value, op, target)
        "merged_residues_per_s": ("serving_650M", bf16.get("merged_residues_per_s"), ">=", 330_000),
        "mixed64_over_merged": ("serving_650M", bf16.get("mixed64_over_merged"), ">=", 0.95),
        "over_transformers_esm": ("serving_650M", bf16.get("over_transformers_esm"), ">=", 2),
        "over_peft_mixed_batch": ("serving_650M", bf16.get("over_peft_mixed_batch"), ">=", 10),
        "mixed64_over_naive": ("serving_650M", bf16.get("mixed64_over_naive"), ">=", 4),
        "adapter_load_ms": ("serving_650M", bf16.get("adapter_load_ms"), "<=", 50),
        "lora_over_full_training": ("training", parts.get("training", {}).get("lora_over_full"), ">=", 1),
        "wrong_answers": ("correctness", sum(p["wrong_answers"] for p in checked) if finished else None, "==", 0),
        # with the passes and steps replayed from CUDA graphs (parts run on request)
        "mixed64_over_merged_graphed": ("serving_graphed", graphed.get("650M", {}).get(
            "mixed64_over_merged_graphed"), ">=", 0.85),
        "wrong_answers_graphed": ("serving_graphed", graphed.get("wrong_answers")
                                  if graphed.get("status") in ("pass", "fail") else None, "==", 0),
        "lora_over_full_training_graphed": ("training_graphed", parts.get("training_graphed", {}).get(
            "lora_over_full_graphed"), ">", 1),
    }
    out = {}
    for name, (part, value, op, target) in measured.items():
        if part not in parts:
            continue
        met = None if value is None else {">=": value >= target, "<=": value <= target, ">": value > target,
                                          "==": value == target}[op]
        if report["smoke"]:  # tiny shapes on a CPU: the figures prove the code runs, not its speed
            met = "smoke run: not judged"
        out[name] = {"value": value, "goal": f"{op} {target}", "met": "not measured" if met is None else met}
    return out


class Run:
    def __init__(self, plan: Plan, base_spec: str | None, out_path: Path | None, budget_scale: float):
        self.plan, self.out_path, self.scale = plan, out_path, budget_scale
        self.bases = Bases(plan, base_spec)
        self.started = time.monotonic()
        self.report: dict = {"check": "bench.gpu_check", "smoke": plan.device == "cpu",
                             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}
        self.lock = threading.Lock()
        self.expired = False

    def write(self, final: bool = False) -> str:
        with self.lock:
            if self.expired and not final:  # the watchdog has written the last word
                return ""
            self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
            self.report["goals"] = goals(self.report)
            statuses = [p["status"] for p in self.report["parts"].values()]
            met = [g["met"] for g in self.report["goals"].values()]
            goals_met = self.report["smoke"] or all(m is True for m in met)
            self.report["status"] = ("pass" if statuses and all(s == "pass" for s in statuses) and goals_met
                                     else "incomplete" if "incomplete" in statuses else "fail")
            text = json.dumps(self.report, default=str)
        if self.out_path:
            tmp = self.out_path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out_path)
        return text

    def watchdog(self) -> threading.Timer:
        """The global limit: a part stuck inside one step is cut off with what was measured so far."""
        def expire():
            with self.lock:
                for part in self.report["parts"].values():
                    if part["status"] == "running":
                        part["status"] = "incomplete"
                        part["stopped_at"] = "the global time limit"
                self.expired = True
            print(self.write(final=True), flush=True)
            os._exit(3)
        timer = threading.Timer(self.plan.overall_s, expire)
        timer.daemon = True
        timer.start()
        return timer

    def part(self, name: str) -> None:
        budget = self.plan.budgets[name] * self.scale
        out = {"status": "running", "budget_s": round(budget, 1)}
        with self.lock:
            self.report["parts"][name] = out
        start = time.monotonic()
        try:
            failures = PARTS[name](self.plan, self.bases, Clock(budget), out)
            out["status"] = "fail" if failures else "pass"
            if failures:
                out["failures"] = failures
        except OutOfTime as exc:
            out.update(status="incomplete", stopped_at=str(exc))
        except Exception as exc:  # the report says what broke; the other parts still run
            out.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                       where=traceback.format_exc().strip().splitlines()[-3:])
        out["seconds"] = round(time.monotonic() - start, 1)
        free(self.plan.device)
        self.write()


def main(argv: list[str] | None = None, watchdog: bool = True) -> dict:
    """watchdog: end the process at the global limit (off when a caller, such as a test, owns it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part on CPU with tiny shapes")
    parser.add_argument("--base", help="the small base (default: the offline 8M)")
    parser.add_argument("--out", type=Path, help="also write the JSON here, after every part")
    parser.add_argument("--results", type=Path, help="or into this folder, named by device and date")
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    parser.add_argument("--overall-s", type=float, help="the global limit (default: the plan's)")
    parser.add_argument("--dtypes", help=f"serving throughput in these dtypes only (of {','.join(TOLERANCE)})")
    args = parser.parse_args(argv)
    plan = copy.deepcopy(SMOKE) if args.smoke else Plan()
    plan.overall_s = args.overall_s or plan.overall_s
    if args.dtypes:
        if unknown := set(args.dtypes.split(",")) - set(TOLERANCE):
            parser.error(f"unknown dtypes {sorted(unknown)}")
        plan.dtypes = tuple(args.dtypes.split(","))
    if plan.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on CPU")
    parts = args.parts.split(",") if args.parts else list(plan.parts)
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}: choose from {list(PARTS)}")
    out = args.out
    if args.results:
        device = torch.cuda.get_device_name(0) if plan.device == "cuda" else "cpu-smoke"
        args.results.mkdir(parents=True, exist_ok=True)
        out = args.results / f"gpu_check-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}-{time.strftime('%Y-%m-%dT%H%M')}.json"
    run = Run(plan, args.base, out, args.budget_scale)
    timer = run.watchdog() if watchdog else None
    for name in parts:
        run.part(name)
    if timer:
        timer.cancel()
    print(run.write(), flush=True)
    return run.report


if __name__ == "__main__":
    main()
