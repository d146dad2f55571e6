"""Batch scoring throughput: serving.batch (Ray Data) against the in-process engine and against
the gRPC service driven at concurrency 64, on the same real sequences and adapters, in one run.
Prints one JSON object (not a timed test).

  python -m bench.batch [--sequences 5000] [--base ...]

Modes, each with 1 and with 8 rank-16 adapters (every sequence scored by every adapter):
- engine: Engine.predict in this process, 64 sequences x the adapters per call, every core;
- batch: python -m serving.batch on a local Ray, one worker on every core (and 2 workers x 1 core
  with 1 adapter, to see how it scales with workers); its wall time with and without its set-up
  (inputs, base, adapter checks, Ray's start);
- service: serving.serve with one single-threaded replica per core, bench.grpc's load generator
  keeping 64 Predict calls (one sequence each) in flight.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import publish_random_adapters, rates, sequences
from bench.grpc import load
from modeling.base import load_base
from serving import serve as service
from serving.engine import Engine, EngineConfig
from serving.serve.ports import free_port


def engine_rate(base_spec, registry: Path, names: list[str], seqs: list[str]) -> dict:
    engine = Engine(load_base(base_spec), registry, EngineConfig(r_max=16, max_device_adapters=len(names)))
    engine.predict([(name, seqs[0]) for name in names])  # warm: every adapter in its slot
    pairs = [(name, s) for s in seqs for name in names]
    start = time.perf_counter()
    for i in range(0, len(seqs), 64):
        results = engine.predict([(name, s) for s in seqs[i:i + 64] for name in names])
        assert not [r for r in results if isinstance(r, Exception)]
    return rates(pairs, time.perf_counter() - start)


def batch_rate(base_spec, registry: Path, names: list[str], fasta: Path, out: Path, workers: int) -> dict:
    cpus = os.cpu_count()
    cmd = [sys.executable, "-m", "serving.batch", "--registry", str(registry), "--input", str(fasta),
           "--output", str(out), "--workers", str(workers), "--cpus-per-worker", str(cpus // workers),
           *(["--base", base_spec] if base_spec else []), *(arg for name in names for arg in ("--adapter", name))]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-3000:]
    job = json.loads((out / "_job.json").read_text())
    assert job["failed_rows"] == 0
    return {"sequences_per_s": round(job["rows"] / wall, 2), "residues_per_s": round(job["residues"] / wall, 1),
            "residues_per_s_after_setup": round(job["residues"] / (wall - job["setup_seconds"]), 1),
            "setup_s": job["setup_seconds"], "wall_s": round(wall, 1), "rows": job["rows"]}


def service_rate(base_spec, registry: Path, names: list[str], seqs: list[str]) -> dict:
    grpc_port = free_port()
    cores = os.cpu_count()
    service.start({"registry": str(registry), "base": base_spec, "max_batch_size": 64, "torch_threads": 1},
                  grpc_port, free_port(), num_replicas=cores, num_cpus=0.5, ray_cpus=cores, http_port=free_port())
    try:
        target = f"127.0.0.1:{grpc_port}"
        load(target, [(name, s) for name in names for s in seqs[:16]], 64)  # warm: every adapter on every replica
        return load(target, [(name, s) for s in seqs for name in names], 64)
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=5000)
    parser.add_argument("--base")
    args = parser.parse_args()
    seqs = sequences(args.sequences, 0)
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                 "sequences": len(seqs), "residues": sum(map(len, seqs))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        registry = tmp / "adapters"
        base = load_base(args.base)
        out["base"] = base.name
        names = publish_random_adapters(base, registry, 8, 16)
        fasta = tmp / "input.fasta"
        fasta.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))
        for label, chosen in (("1_adapter", names[:1]), ("8_adapters", names)):
            result = out[label] = {}
            result["engine"] = engine_rate(args.base, registry, chosen, seqs)
            result["batch"] = batch_rate(args.base, registry, chosen, fasta, tmp / f"out-{label}", 1)
            result["service_c64"] = service_rate(args.base, registry, chosen, seqs)
            engine, job = result["engine"]["residues_per_s"], result["batch"]
            result["batch_over_engine"] = round(job["residues_per_s"] / engine, 3)
            result["batch_over_engine_after_setup"] = round(job["residues_per_s_after_setup"] / engine, 3)
            result["batch_over_service"] = round(job["residues_per_s"] / result["service_c64"]["residues_per_s"], 3)
        two = batch_rate(args.base, registry, names[:1], fasta, tmp / "out-2-workers", 2)
        out["1_adapter"]["batch_2_workers"] = two
        out["1_adapter"]["two_workers_over_one"] = round(two["residues_per_s"] /
                                                         out["1_adapter"]["batch"]["residues_per_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
