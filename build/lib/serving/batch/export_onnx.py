"""Export one adapter, merged into the base, as an ONNX model (dynamic batch and length): the command
line of serving/engine/onnx_export.py.

  python -m serving.batch.export_onnx --adapter NAME[@VERSION] --out model.onnx [--registry adapters] [--base ...]

The graph takes `tokens` (int64, batch x (length+2), <cls> seq <eos> <pad>...) and returns `outputs`:
per-residue logits (batch x length x classes) or per-sequence outputs (batch x classes).
The adapter ref, base fingerprint and output spec travel in the model's metadata.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.batch.export_onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="NAME or NAME@VERSION in the registry")
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--registry", default="adapters", type=Path, help="the registry folder (default: adapters)")
    parser.add_argument("--base", help="the base the adapter was trained on (default: the default base)")
    parser.add_argument("--r-max", type=int, default=64, help="the largest rank accepted (default 64)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from modeling.base import load_base  # torch loads here, after the arguments are read
    from serving.engine import Engine, EngineConfig
    from serving.engine.onnx_export import export
    try:
        engine = Engine(load_base(args.base), args.registry, EngineConfig(r_max=args.r_max, max_device_adapters=1))
        print(f"exported {export(engine, args.adapter, args.out)}")
    except (LookupError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
