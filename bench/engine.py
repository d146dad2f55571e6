"""Serving-engine benchmark: prints one JSON object (not a timed test).

  python -m bench.engine [--sequences 256] [--base ...]

Real sequences (FLIP sec_str val+test, 50-500 residues, fixed seed) on the default base, random
rank-16 adapters published as real bundles; every figure comes from this one run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from esm.model.esm2 import ESM2

from modeling import bundle as bundles
from modeling.alphabet import tokenize
from modeling.base import load_base
from modeling.encoder import stock_fair_esm
from modeling.heads import HeadSpec, PER_RESIDUE
from modeling.lora import LoraSpec, add_lora, export_adapter
from modeling.model import TaskModel
from serving.engine import Engine, EngineConfig
from training.data import load_splits
from training.tasks import TASKS


def sequences(n: int, seed: int) -> list[str]:
    splits = load_splits(TASKS["sec_str"])
    pool = [r.sequence for r in splits["val"] + splits["test"] if 50 <= len(r.sequence) <= 500]
    return random.Random(seed).sample(pool, n)


def publish_random_adapters(base, registry: Path, count: int, rank: int, prefix: str = "bench") -> list[str]:
    names = []
    for i in range(count):
        torch.manual_seed(i)
        encoder = copy.deepcopy(base.encoder)
        spec = LoraSpec(rank=rank, alpha=2 * rank)
        add_lora(encoder, spec, encoder.shape.num_layers)
        for p in encoder.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.02)
        model = TaskModel(encoder, HeadSpec(PER_RESIDUE, 3, encoder.embed_dim))
        config, tensors = export_adapter(encoder, spec, encoder.shape.num_layers)
        manifest = {"task": "sec_str", "mode": "lora", "output": {"kind": PER_RESIDUE, "labels": list("HEC")},
                    "head": model.head_spec.as_dict(), "lora": spec.as_dict(),
                    "base": {"fingerprint": base.fingerprint}, "metrics": {}}
        staged = bundles.staging_dir(registry)
        bundles.write_bundle(staged, manifest, {bundles.ADAPTER_WEIGHTS: tensors,
                                                bundles.HEAD_WEIGHTS: model.head.state_dict()},
                             {bundles.ADAPTER_CONFIG: config})
        bundles.publish(staged, registry, f"{prefix}{i}")
        names.append(f"{prefix}{i}")
    return names


def rates(requests: list[tuple[str, str]], seconds: float) -> dict:
    """Sequences and residues per second for (adapter, sequence) requests served in `seconds`."""
    residues = sum(len(s) for _, s in requests)
    return {"sequences_per_s": round(len(requests) / seconds, 2), "residues_per_s": round(residues / seconds, 1)}


def throughput(engine: Engine, requests: list[tuple[str, str]]) -> dict:
    engine.predict(requests[:8])  # warm-up
    start = time.perf_counter()
    results = engine.predict(requests)
    seconds = time.perf_counter() - start
    assert all(not isinstance(r, Exception) for r in results), [r for r in results if isinstance(r, Exception)][:1]
    return rates(requests, seconds)


def naive_peft(encoder: torch.nn.Module, registry: Path, names: list[str], requests: list[tuple[str, str]],
               batch: int) -> dict:
    """What a user would write: one PeftModel holding every adapter, set_adapter per group.
    `encoder` is fair-esm's ESM2 (called for its last layer's representations) or our encoder."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from modeling.heads import build_head
    from modeling.heads import residues as residue_part
    model = PeftModel.from_pretrained(encoder, registry / names[0] / "1", adapter_name=names[0])
    heads = {}
    for name in names:
        folder = registry / name / "1"
        if name != names[0]:
            model.load_adapter(folder, adapter_name=name)
        manifest = json.loads((folder / "manifest.json").read_text())
        heads[name] = build_head(HeadSpec(**manifest["head"])).eval()
        heads[name].load_state_dict(load_file(folder / "head.safetensors"))
    model.eval()
    stock, last = isinstance(encoder, ESM2), len(encoder.layers)

    def represent(tokens):
        if stock:
            return model(tokens, repr_layers=[last])["representations"][last]
        return model(tokens)

    groups: dict[str, list[str]] = {}
    for name, seq in requests:
        groups.setdefault(name, []).append(seq)
    start = time.perf_counter()
    with torch.no_grad():
        for name, seqs in groups.items():
            model.set_adapter(name)
            for i in range(0, len(seqs), batch):
                tokens = tokenize(seqs[i:i + batch])
                reps, mask = residue_part(represent(tokens), tokens.ne(1).sum(-1) - 2)
                heads[name](reps, mask)
    return rates(requests, time.perf_counter() - start)


def cold_traffic(engine: Engine, batches: list[list[tuple[str, str]]], prefetch: bool) -> float:
    """Seconds to serve batches that each name adapters never seen before. With prefetch, the
    adapters of batch i+1 load (disk -> device slot) while batch i runs, as the service does
    for requests queued behind a running batch."""
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        if prefetch and i + 1 < len(batches):
            for name in dict.fromkeys(name for name, _ in batches[i + 1]):
                engine.prefetch(name)
        results = engine.predict(batch)
        assert all(not isinstance(r, Exception) for r in results)
    return time.perf_counter() - start


def rss_mb() -> float:
    """Resident set size after returning freed heap pages to the OS (less allocator slack)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


MEMORY_PROBE = """
import gc, json, os, sys
from pathlib import Path
from modeling.base import load_base
from serving.engine import Engine, EngineConfig
from bench.engine import rss_mb
registry, names, config, base = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] or None
base = load_base(base)
gc.collect()
before = rss_mb()  # the bare base: everything the engine adds for adapters counts against them
engine = Engine(base, registry, EngineConfig(**config))
for name in names:
    adapter = engine.load(name)
    engine._acquire(adapter)
    engine.slots.release(adapter.ref)
gc.collect()
print(json.dumps({"registered": len(engine.registry.entries()), "delta_mb": rss_mb() - before,
                  "weights_mb": engine.load(names[0]).nbytes / 2**20}))
"""


def measure_memory(registry: Path, names: list[str], config: dict, base: str | None) -> dict:
    """In a fresh process, so freed memory from earlier measurements cannot hide the growth."""
    import subprocess
    import sys
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(registry), json.dumps(names),
                            json.dumps(config), base or ""], capture_output=True, text=True, check=True)
    m = json.loads(probe.stdout.strip().splitlines()[-1])
    per_adapter = m["delta_mb"] / len(names)
    return {"registered": m["registered"], "device_resident": len(names),
            "memory_per_adapter_mb": round(per_adapter, 3), "adapter_weights_mb": round(m["weights_mb"], 3),
            "memory_over_weights": round(per_adapter / m["weights_mb"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--registered", type=int, default=1000)
    parser.add_argument("--base")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                            f"({torch.get_num_threads()} threads), device cpu",
                 "sequences": args.sequences, "rank": args.rank}
    base = load_base(args.base)
    out["base"] = base.name
    seqs = sorted(sequences(args.sequences, args.seed), key=len)  # adapters assigned along the sorted
    with tempfile.TemporaryDirectory() as tmp:                   # order, so every batch mixes them all
        registry = Path(tmp) / "adapters"
        names = publish_random_adapters(base, registry, 64 + 20 + 2 * 32, args.rank)
        cold, warm64, fresh_sets = names[64:84], names[:64], (names[84:116], names[116:148])
        config = dict(r_max=args.rank, max_device_adapters=64, max_batch_size=64)  # device-default residue cap

        engine = Engine(load_base(args.base), registry, EngineConfig(**config))
        one = [(warm64[0], s) for s in seqs]
        out["unmerged_1"] = throughput(engine, one)
        out["mixed_8"] = throughput(engine, [(warm64[i % 8], s) for i, s in enumerate(seqs)])
        mixed64 = [(warm64[i % 64], s) for i, s in enumerate(seqs)]
        out["mixed_64"] = throughput(engine, mixed64)
        merged = Engine(load_base(args.base), registry, EngineConfig(**config, merged=(warm64[0],)))
        out["merged_1"] = throughput(merged, one)
        # the same with batches of 64 sequences, i.e. all 64 adapters in every single batch
        whole = dict(config, max_batch_residues=64 * 502)
        out["mixed_64_batch64"] = throughput(Engine(load_base(args.base), registry, EngineConfig(**whole)), mixed64)
        out["merged_1_batch64"] = throughput(
            Engine(load_base(args.base), registry, EngineConfig(**whole, merged=(warm64[0],))), one)
        # the naive baseline on fair-esm's own ESM2 (what a user of fair-esm + peft would write; its LM
        # head, ~1.5% of the t6 model's FLOPs, runs too), and the same on our encoder: the ratio of the
        # two is what our fused attention gives, the rest batching
        out["naive_peft_64"] = naive_peft(stock_fair_esm(base.encoder), registry, warm64, mixed64, batch=64)
        out["naive_peft_64_our_encoder"] = naive_peft(copy.deepcopy(base.encoder), registry, warm64, mixed64, 64)
        # the padded-residue cap per forward pass (the device default on CPU is 512)
        out["mixed_64_by_max_batch_residues"] = {
            cap: throughput(Engine(load_base(args.base), registry, EngineConfig(**config, max_batch_residues=cap)),
                            mixed64)["residues_per_s"] for cap in (256, 512, 1024, 2048, 4096)}

        # the same 64-adapter traffic on a bfloat16 engine (bf16 instructions where the CPU has them)
        out["mixed_64_bfloat16"] = throughput(
            Engine(load_base(args.base), registry, EngineConfig(**config, dtype="bfloat16")), mixed64)

        # cold load: disk -> verified CPU tensors -> device slot, for adapters never seen before
        times = []
        for name in cold:
            start = time.perf_counter()
            adapter = engine.load(name)
            engine._acquire(adapter)
            engine.slots.release(adapter.ref)
            times.append((time.perf_counter() - start) * 1000)
        out["adapter_load_ms"] = round(statistics.median(times), 2)

        # loading overlapped with compute: 8 batches of 16 sequences, 4 new adapters in each
        short = [s for s in seqs if len(s) <= 200][:16]
        timings = {}
        for mode, fresh_names in zip(("sequential", "prefetch"), fresh_sets):
            batches = [[(fresh_names[4 * b + i % 4], s) for i, s in enumerate(short)] for b in range(8)]
            cold_engine = Engine(load_base(args.base), registry, EngineConfig(**config, prefetch=True))
            cold_engine.predict([(warm64[0], short[0])])  # warm-up, not one of the cold adapters
            timings[mode] = cold_traffic(cold_engine, batches, prefetch=mode == "prefetch")
        out["cold_traffic_s"] = {k: round(v, 3) for k, v in timings.items()}
        out["cold_traffic_prefetch_speedup"] = round(timings["sequential"] / timings["prefetch"], 3)

        # memory: 1000 registered (hard links of real bundles), 64 resident on the device tier
        for i in range(args.registered - len(names)):
            src, dst = registry / names[i % len(names)] / "1", registry / f"extra{i}" / "1"
            dst.mkdir(parents=True)
            for f in src.iterdir():
                os.link(f, dst / f.name)
        out.update(measure_memory(registry, warm64, config, args.base))
        fresh = Engine(load_base(args.base), registry, EngineConfig(**config))

        # ONNX vs torch, merged, batch 8 x 256
        from serving.export_onnx import export
        from serving.onnx_runner import OnnxModel
        onnx_path = export(fresh, warm64[0], Path(tmp) / "m.onnx")
        onnx_model = OnnxModel(onnx_path)
        torch_model = fresh.merged_encoder(fresh.load(warm64[0]))
        tokens = tokenize([s[:256].ljust(256, "A") for s in random.Random(1).sample(seqs, 8)])
        def median_ms(fn, reps=7):
            fn()
            samples = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1000)
            return statistics.median(samples)
        with torch.no_grad():
            torch_ms = median_ms(lambda: torch_model(tokens))
        onnx_ms = median_ms(lambda: onnx_model(tokens))
        out["torch_merged_ms_8x256"], out["onnx_ms_8x256"] = round(torch_ms, 1), round(onnx_ms, 1)
        out["onnx_over_torch_latency"] = round(onnx_ms / torch_ms, 3)

    def ratio(a: str, b: str) -> float:
        return round(out[a]["residues_per_s"] / out[b]["residues_per_s"], 3)

    out["mixed64_over_merged"] = ratio("mixed_64", "merged_1")
    out["mixed64_over_merged_batch64"] = ratio("mixed_64_batch64", "merged_1_batch64")
    out["mixed64_over_naive"] = ratio("mixed_64", "naive_peft_64")
    out["mixed64_over_naive_our_encoder"] = ratio("mixed_64", "naive_peft_64_our_encoder")
    out["bfloat16_over_float32_mixed64"] = ratio("mixed_64_bfloat16", "mixed_64")
    out["unmerged_over_merged"] = ratio("unmerged_1", "merged_1")
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
