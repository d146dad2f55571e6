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
from concurrent.futures import Future
from pathlib import Path

import torch
from esm.model.esm2 import ESM2

from modeling import bundle as bundles
from modeling import registry as store
from modeling.alphabet import tokenize
from modeling.base import load_base
from modeling.encoder import reset_rotary_caches, stock_fair_esm
from modeling.heads import PER_RESIDUE, REGRESSION, SEQUENCE_CLASS, HeadSpec, build_head
from modeling.heads import residues as residue_part
from modeling.lora import PEFT_PREFIX, LoraSpec, adapter_config
from serving.engine import Engine, EngineConfig
from training.data import load_splits
from training.tasks import TASKS


def sequences(n: int, seed: int) -> list[str]:
    splits = load_splits(TASKS["sec_str"])
    pool = [r.sequence for r in splits["val"] + splits["test"] if 50 <= len(r.sequence) <= 500]
    return random.Random(seed).sample(pool, n)


def random_lora_tensors(shape, spec: LoraSpec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """PEFT-format A/B weights, N(0, 0.02), for every targeted linear of an encoder of `shape`."""
    dims = {"fc1": (4 * shape.embed_dim, shape.embed_dim), "fc2": (shape.embed_dim, 4 * shape.embed_dim)}
    tensors = {}
    for layer in range(shape.num_layers):
        for target in spec.targets:
            d_out, d_in = dims.get(target, (shape.embed_dim, shape.embed_dim))
            path = f"{PEFT_PREFIX}layers.{layer}.{target if target in dims else 'self_attn.' + target}"
            tensors[f"{path}.lora_A.weight"] = torch.randn(spec.rank, d_in, generator=generator) * 0.02
            tensors[f"{path}.lora_B.weight"] = torch.randn(d_out, spec.rank, generator=generator) * 0.02
    return tensors


HEAD_LABELS = {PER_RESIDUE: list("HEC"), SEQUENCE_CLASS: ["a", "b", "c", "d"], REGRESSION: []}


def publish_random_adapters(base, registry: Path, count: int, rank: int | list[int], prefix: str = "bench",
                            kinds: tuple[str, ...] = (PER_RESIDUE,), mode: str = "lora") -> list[str]:
    """`count` random adapters published as real bundles; adapter i gets rank[i % len(rank)] (or
    `rank`) and head kind kinds[i % len(kinds)]; mode "frozen" publishes heads alone. Built from
    tensors, not a model copy per adapter, so that a hundred adapters of a 650M base take seconds."""
    ranks = rank if isinstance(rank, list) else [rank]
    shape = base.encoder.shape
    names = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        spec = LoraSpec(rank=ranks[i % len(ranks)], alpha=2 * ranks[i % len(ranks)])
        kind = kinds[i % len(kinds)]
        labels = HEAD_LABELS[kind]
        torch.manual_seed(i)
        head_spec = HeadSpec(kind, len(labels) or 1, shape.embed_dim)
        head = build_head(head_spec)
        lora = mode == "lora"
        manifest = {"task": f"random-{kind}", "mode": mode, "output": {"kind": kind, "labels": labels},
                    "head": head_spec.as_dict(), "lora": spec.as_dict() if lora else None,
                    "base": {"fingerprint": base.fingerprint}, "metrics": {}}
        tensors = {bundles.HEAD_WEIGHTS: head.state_dict()}
        if lora:
            tensors[bundles.ADAPTER_WEIGHTS] = random_lora_tensors(shape, spec, generator)
        staged = store.staging_dir(registry)
        bundles.write_bundle(staged, manifest, tensors,
                             {bundles.ADAPTER_CONFIG: adapter_config(spec, shape.num_layers)} if lora else {})
        store.publish(staged, registry, f"{prefix}{i}")
        names.append(f"{prefix}{i}")
    return names


def rates(requests: list[tuple[str, str]], seconds: float) -> dict:
    """Sequences and residues per second for (adapter, sequence) requests served in `seconds`."""
    residues = sum(len(s) for _, s in requests)
    return {"sequences_per_s": round(len(requests) / seconds, 2), "residues_per_s": round(residues / seconds, 1)}


def throughput(engine: Engine, requests: list[tuple[str, str]], repeats: int = 1) -> dict:
    """Rates of the best of `repeats` timed passes, after a warm-up."""
    engine.predict(requests[:8])  # warm-up
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        results = engine.predict(requests)
        seconds = min(seconds, time.perf_counter() - start)
        assert all(not isinstance(r, Exception) for r in results), [r for r in results if isinstance(r, Exception)][:1]
    return rates(requests, seconds)


class NaivePeft:
    """What a user would write: one PeftModel holding every adapter, set_adapter per group.
    `encoder` is fair-esm's ESM2 (called for its last layer's representations) or our encoder."""

    def __init__(self, encoder: torch.nn.Module, registry: Path, names: list[str]):
        from peft import PeftModel
        from safetensors.torch import load_file

        self.model = PeftModel.from_pretrained(encoder, registry / names[0] / "1", adapter_name=names[0])
        self.heads = {}
        for name in names:
            folder = registry / name / "1"
            if name != names[0]:
                self.model.load_adapter(folder, adapter_name=name)
            manifest = json.loads((folder / "manifest.json").read_text())
            self.heads[name] = build_head(HeadSpec(**manifest["head"])).eval()
            self.heads[name].load_state_dict(load_file(folder / "head.safetensors"))
        self.model.eval()
        self.stock, self.last = isinstance(encoder, ESM2), len(encoder.layers)
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "NaivePeft":
        self.device = torch.device(device)
        self.model.to(self.device, dtype)
        reset_rotary_caches(self.model)
        for head in self.heads.values():
            head.to(self.device, dtype)
        return self

    def represent(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.stock:
            return self.model(tokens, repr_layers=[self.last])["representations"][self.last]
        return self.model(tokens)

    def serve(self, requests: list[tuple[str, str]], batch: int) -> dict:
        groups: dict[str, list[str]] = {}
        for name, seq in requests:
            groups.setdefault(name, []).append(seq)
        start = time.perf_counter()
        with torch.no_grad():
            for name, seqs in groups.items():
                self.model.set_adapter(name)
                for i in range(0, len(seqs), batch):
                    tokens = tokenize(seqs[i:i + batch]).to(self.device)
                    reps, mask = residue_part(self.represent(tokens), tokens.ne(1).sum(-1) - 2)
                    self.heads[name](reps, mask).float().cpu()  # the answers reach the host, as the engine's
        return rates(requests, time.perf_counter() - start)


def online_rates(engine: Engine, requests: list[tuple[str, str]], per_call: int) -> dict:
    """Requests in arrival order, `per_call` at a time (what an online service's batcher hands over)."""
    calls = [requests[i:i + per_call] for i in range(0, len(requests), per_call)]
    engine.predict(requests)  # warm-up: every adapter in its slot, so no call times a cold load
    start = time.perf_counter()
    for call in calls:
        engine.predict(call)
    return rates(requests, time.perf_counter() - start)


def cold_load_ms(engine: Engine, names: list[str]) -> dict[str, list[float]]:
    """For each adapter never seen before, in ms: `total`, disk -> verified CPU tensors (checksums
    included) -> a usable device slot; `read`, its first part (disk -> the verified, packed CPU tier)."""
    times = {"total": [], "read": []}
    for name in names:
        start = time.perf_counter()
        adapter = engine.load(name)
        times["read"].append((time.perf_counter() - start) * 1000)
        engine._acquire(adapter)
        engine.slots.release(adapter.key)
        if engine.device.type == "cuda":  # the slot copy runs on a side stream: usable once it landed
            torch.cuda.synchronize(engine.device)
        times["total"].append((time.perf_counter() - start) * 1000)
    return times


class Inline:
    """An executor that runs each digest at once, on the calling thread: the sequential way."""

    def submit(self, fn, *args) -> Future:
        done = Future()
        done.set_result(fn(*args))
        return done


def both_ways(engine: Engine, names: list[str]) -> dict[str, dict[str, list[float]]]:
    """Cold loads of `names` (never seen by `engine`), alternating between the digests beside the
    parsing ("overlapped", what read_bundle does) and before it ("sequential"): per way, what
    cold_load_ms measures."""
    overlapped = bundles._HASHERS
    times = {way: {"total": [], "read": []} for way in ("overlapped", "sequential")}
    for i, name in enumerate(names):
        way = "sequential" if i % 2 else "overlapped"
        bundles._HASHERS = Inline() if way == "sequential" else overlapped
        try:
            for key, ms in cold_load_ms(engine, [name]).items():
                times[way][key] += ms
        finally:
            bundles._HASHERS = overlapped
    return times


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
from bench.engine import rss_mb, weights_bytes
registry, names, config, base = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] or None
base = load_base(base)
gc.collect()
before = rss_mb()  # the bare base: everything the engine adds for adapters counts against them
engine = Engine(base, registry, EngineConfig(**config))
for name in names:
    adapter = engine.load(name)
    engine._acquire(adapter)
    engine.slots.release(adapter.key)
gc.collect()
print(json.dumps({"registered": len(engine.registry.entries()), "delta_mb": rss_mb() - before,
                  "weights_mb": weights_bytes(engine, names[0]) / 2**20}))
"""


def weights_bytes(engine: Engine, name: str) -> int:
    """The adapter's own weights (A, B, bias and head, float32) as its bundle stores them."""
    folder = engine.registry.resolve(name).folder
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


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
        out["mixed_64"] = throughput(engine, mixed64, repeats=2)  # the second pass: every adapter warm
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
        out["naive_peft_64"] = NaivePeft(stock_fair_esm(base.encoder), registry, warm64).serve(mixed64, batch=64)
        out["naive_peft_64_our_encoder"] = NaivePeft(copy.deepcopy(base.encoder), registry, warm64).serve(mixed64, 64)
        # the Hugging Face peers (bench/hf_peers.py): peft's own mixed-adapter batches on transformers'
        # EsmModel, and EsmModel holding the merged adapter, sorted batches of 64 sequences
        from bench.hf_peers import HfPeftMixed, hf_esm, hf_serve
        peft_mixed = HfPeftMixed(hf_esm(base.encoder, "cpu", torch.float32), registry, warm64)
        peft_mixed.serve(mixed64[:8], 64)  # warm-up
        out["peft_mixed_batch_64"] = peft_mixed.serve(mixed64, 64)
        del peft_mixed
        merged_adapter = merged.load(warm64[0])
        hf_merged = hf_esm(merged.merged_encoder(merged_adapter), "cpu", torch.float32)
        hf_serve(hf_merged, merged_adapter.head, seqs[:8], 64)  # warm-up
        out["transformers_esm_merged_1"] = hf_serve(hf_merged, merged_adapter.head, seqs, 64)
        del hf_merged

        # packing (modeling/encoder.py Packing, the CPU default) against the padded path, same
        # sequences and cap: the sorted traffic above, and online traffic (calls of 8 sequences in
        # arrival order, the engine's CPU cap and a cap four times larger)
        padded = Engine(load_base(args.base), registry, EngineConfig(**config, packed=False))
        out["mixed_64_padded"] = throughput(padded, mixed64, repeats=2)
        arrivals = [(warm64[i % 64], s) for i, s in enumerate(sequences(args.sequences, args.seed))]
        for cap in (512, 2048):
            for packed in (True, False):
                online = Engine(load_base(args.base), registry,
                                EngineConfig(**dict(config, max_batch_residues=cap), packed=packed))
                out[f"online_8_{'packed' if packed else 'padded'}_cap{cap}"] = online_rates(online, arrivals, 8)
        # the residue cap per forward pass (real tokens, packed; the CPU default is 2048)
        out["mixed_64_by_max_batch_residues"] = {
            cap: throughput(Engine(load_base(args.base), registry, EngineConfig(**config, max_batch_residues=cap)),
                            mixed64)["residues_per_s"] for cap in (256, 512, 1024, 2048, 4096)}

        # the same 64-adapter traffic on a bfloat16 engine (bf16 instructions where the CPU has them)
        out["mixed_64_bfloat16"] = throughput(
            Engine(load_base(args.base), registry, EngineConfig(**config, dtype="bfloat16")), mixed64)

        out["adapter_load_ms"] = round(statistics.median(cold_load_ms(engine, cold)["total"]), 2)

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
        from serving.engine.onnx_export import export
        from serving.engine.onnx_runner import OnnxModel
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
    out["mixed64_over_peft_mixed_batch"] = ratio("mixed_64", "peft_mixed_batch_64")
    out["merged_over_transformers_esm"] = ratio("merged_1", "transformers_esm_merged_1")
    out["packed_over_padded"] = ratio("mixed_64", "mixed_64_padded")
    for cap in (512, 2048):
        out[f"packed_over_padded_online_cap{cap}"] = ratio(f"online_8_packed_cap{cap}", f"online_8_padded_cap{cap}")
    out["bfloat16_over_float32_mixed64"] = ratio("mixed_64_bfloat16", "mixed_64")
    out["unmerged_over_merged"] = ratio("unmerged_1", "merged_1")
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
