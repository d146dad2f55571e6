"""Evaluate an adapter on a data file; prints one JSON object.

  python -m training.evaluate --adapter sec_str-r16 --data test.csv [--task sec_str] [--registry adapters]

--adapter is a bundle folder or a registry NAME[@VERSION]. --data is any CSV / FASTA / FLIP split zip
the trainer reads; rows need no split column (every row is scored). Files without a `resolved`
column score every labelled residue.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from modeling.bundle import BundleError
from training.data import DataError, crop, read_file
from training.tasks import get_task, task_from_dict


def evaluate(adapter: str, data: Path, task_name: str | None = None, registry: Path = Path("adapters"),
             base_spec: str | None = None, batch_size: int = 16, device: str = "auto") -> dict:
    """device: auto (the GPU when torch sees one), cuda or cpu."""
    from modeling.base import load_base  # torch loads here, after the arguments are read
    from modeling.model import load_task_model
    from training.datamodule import TargetScale
    from training.predict import predict, score, scoring_device
    from training.run import resolve_bundle
    device = scoring_device(device)
    bundle = resolve_bundle(adapter, registry)
    manifest = bundle.manifest
    if task_name:
        task = get_task(task_name)
    elif "task_spec" in manifest:  # the declaration it was trained with (a user's task too)
        task = task_from_dict(manifest["task_spec"], f"{bundle.folder}/manifest.json")
    else:
        task = get_task(manifest["task"])
    if task.kind != manifest["output"]["kind"] or (task.labels and list(task.labels) != manifest["output"]["labels"]):
        raise DataError(f"task {task.name} does not match the adapter's output ({manifest['task']})")
    base = load_base(base_spec or manifest["base"].get("source"))
    if base.fingerprint != manifest["base"]["fingerprint"]:
        raise BundleError(f"{bundle.folder}: trained on base {manifest['base']['fingerprint'][:12]}, "
                          f"loaded base is {base.fingerprint[:12]}; pass --base")
    records, cropped = crop([replace(r, split="test") for r in read_file(Path(data), task)])
    model = load_task_model(base.encoder, bundle).to(device)
    output = manifest["output"]
    scale = TargetScale(output.get("target_mean", 0.0), output.get("target_std", 1.0))
    result = score(task, records, predict(model, records, batch_size, device), scale)
    return {"adapter": bundle.ref, "task": task.name, "data": str(data), "cropped": cropped, **result}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="a bundle folder, or NAME[@VERSION] in --registry")
    p.add_argument("--data", required=True, help="a CSV, FASTA or FLIP split zip; every row is scored")
    p.add_argument("--task", help="the task to read the data as (default: the one recorded in the bundle)")
    p.add_argument("--registry", default="adapters", help="the registry folder (default adapters)")
    p.add_argument("--base", help="base weights (default: where the adapter was trained)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto (the default): the GPU when torch sees one")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parser().parse_args(argv)
    try:
        result = evaluate(args.adapter, Path(args.data), args.task, Path(args.registry), args.base,
                          args.batch_size, args.device)
    except (DataError, BundleError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
