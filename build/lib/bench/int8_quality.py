"""What quantize=int8 costs in quality: each adapter's test split scored through the engine in
float32 and in int8, with the task's own metric. Prints one JSON object.

  python -m bench.int8_quality --registry adapters --adapter sec_str-r16 --adapter gb1-r16

The test split is the one the adapter's task declares (sec_str: NEW364; gb1: two_vs_rest's test).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from modeling.base import load_base
from modeling.heads import PER_RESIDUE, REGRESSION
from serving.engine import Engine, EngineConfig
from training.data import crop, load_splits
from training.datamodule import TargetScale
from training.predict import score as training_score
from training.tasks import TASKS, get_task, task_from_dict


def score(task, records, predictions) -> dict:
    """The task's metrics from the engine's answers, through training's own scoring: each answer
    as the one-hot (or value) output whose argmax (or value) it is."""
    if task.kind == REGRESSION:
        outputs = [np.array([p.value]) for p in predictions]
    elif task.kind == PER_RESIDUE:
        outputs = [np.eye(len(task.labels))[[task.labels.index(c) for c in p.labels]] for p in predictions]
    else:
        outputs = [np.eye(len(task.labels))[task.labels.index(p.label)] for p in predictions]
    result = training_score(task, records, outputs, TargetScale(0.0, 1.0))  # values are already scaled
    return {task.metric: round(result[task.metric], 5)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=Path("adapters"))
    parser.add_argument("--adapter", action="append", required=True)
    parser.add_argument("--base")
    args = parser.parse_args(argv)
    engines = {q: Engine(load_base(args.base), args.registry, EngineConfig(quantize=q)) for q in ("none", "int8")}
    out: dict = {}
    for name in args.adapter:
        adapter = engines["none"].load(name)
        manifest = adapter.manifest
        # a built-in task finds its vendored data; a user's task its own declaration
        task = get_task(manifest["task"]) if manifest["task"] in TASKS else task_from_dict(manifest["task_spec"], name)
        records, _ = crop(load_splits(task)["test"])
        row: dict = {"task": task.name, "test_sequences": len(records)}
        for quantize, engine in engines.items():
            start = time.perf_counter()
            predictions = engine.predict([(adapter.ref, r.sequence) for r in records])
            row[quantize] = {**score(task, records, predictions), "seconds": round(time.perf_counter() - start, 1)}
        row["int8_minus_float32"] = round(row["int8"][task.metric] - row["none"][task.metric], 5)
        out[adapter.ref] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
