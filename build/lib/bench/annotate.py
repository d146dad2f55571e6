"""Annotating sequences with many head-only adapters: one engine call for every (adapter, sequence)
pair, where the adapters share each sequence's encoder pass, against one call per adapter.
Prints one JSON object (not a timed test).

  python -m bench.annotate [--sequences 256] [--adapters 8] [--base ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import publish_random_adapters, rates, sequences
from modeling.base import load_base
from modeling.heads import PER_RESIDUE, REGRESSION, SEQUENCE_CLASS
from serving.engine import Engine, EngineConfig


def timed(engine: Engine, calls: list[list[tuple]]) -> float:
    start = time.perf_counter()
    for requests in calls:
        results = engine.predict(requests)
        assert not [r for r in results if isinstance(r, Exception)]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--base")
    args = parser.parse_args()
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                      f"({torch.get_num_threads()} threads), device cpu",
           "sequences": args.sequences, "adapters": args.adapters, "mode": "frozen (head-only)"}
    seqs = sequences(args.sequences, 0)
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "adapters"
        base = load_base(args.base)
        out["base"] = base.name
        names = publish_random_adapters(base, registry, args.adapters, 16, prefix="head",
                                        kinds=(PER_RESIDUE, SEQUENCE_CLASS, REGRESSION), mode="frozen")
        engine = Engine(base, registry, EngineConfig(r_max=16))
        pairs = [(name, s) for s in seqs for name in names]
        engine.predict(pairs[:2 * args.adapters])  # warm-up: every head loaded
        rows = {}
        before = engine.stats["encoded"]
        separate = timed(engine, [[(name, s) for s in seqs] for name in names])
        rows["separate"], before = engine.stats["encoded"] - before, engine.stats["encoded"]
        together = timed(engine, [pairs])
        rows["one_call"] = engine.stats["encoded"] - before
        out["encoder_rows"] = rows
        out["separate_calls"] = dict(rates(pairs, separate), seconds=round(separate, 2))
        out["one_call"] = dict(rates(pairs, together), seconds=round(together, 2))
        out["one_call_over_separate"] = round(separate / together, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
