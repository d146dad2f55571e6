"""Cold adapter loads with the checksums beside the parsing or before it: prints one JSON object.

  python -m bench.cold_load [--adapters 20] [--threads 1] [--layers 33 --width 1280]

A cold load (disk -> verified, packed CPU tier -> device slot) hashes every file of the bundle
(sha256, ~20 ms for a 650M rank-16 adapter here) and parses and packs it (about as long).
`read_bundle` runs the digests on other threads while the parsing and packing run (hashlib
releases the GIL), which pays where a core is free: on a GPU host, not on a 2-core machine whose
torch already uses both. Loads alternate between the two ways in one run, on one engine, so both
see the same machine; `--threads` is torch's intra-op thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from bench.engine import both_ways, cold_load_ms, publish_random_adapters
from bench.gpu_check import random_base
from modeling import bundle as bundles
from modeling.encoder import EncoderShape
from serving.engine import Engine, EngineConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=20, help="cold loads per way")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=33)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = EncoderShape(args.layers, args.width, max(1, args.width // 64))
    base = random_base(shape, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp)
        names = publish_random_adapters(base, registry, 2 * args.adapters + 2, args.rank)
        engine = Engine(base, registry, EngineConfig(r_max=args.rank, dtype="bfloat16",
                                                     max_device_adapters=2 * args.adapters + 2))
        cold_load_ms(engine, names[:2])  # warm-up
        times = both_ways(engine, names[2:])
        adapter_mb = (registry / names[0] / "1" / bundles.ADAPTER_WEIGHTS).stat().st_size / 2**20
    medians = {way: round(statistics.median(ms["total"]), 2) for way, ms in times.items()}
    out = {"shape": f"{shape.num_layers}x{shape.embed_dim}", "rank": args.rank, "adapter_mb": round(adapter_mb, 1),
           "torch_threads": args.threads, "cpus": os.cpu_count(), "adapters_per_way": args.adapters,
           "cold_load_ms": medians,
           "overlapped_over_sequential": round(medians["overlapped"] / medians["sequential"], 3)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
