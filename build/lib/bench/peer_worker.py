"""Runs inside esm.cpp's own virtual environment (numpy < 2), started by bench/peer.py: imports
nothing from this project. Reads {"model", "sequences", "probe", "repeats"} as JSON on stdin,
prints JSON.

For fp32 and then INT8 (esm.cpp's quantize_weights: per-channel weights, no calibration), the
residues/s of forward_scheduled (packed, length-bucketed) and forward_batch, best of `repeats` after
one warm-up pass, plus the final hidden states of the probe sequences for the accuracy check."""
import json
import sys
import time

import esm_cpp
import numpy as np


def best_rate(run, residues: int, repeats: int) -> float:
    run()  # warm-up: workspaces, thread pool
    best = min(_timed(run) for _ in range(repeats))
    return residues / best


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(model, ids: list, residues: int, repeats: int) -> dict:
    return {"forward_scheduled": round(best_rate(lambda: model.forward_scheduled(ids), residues, repeats), 1),
            "forward_batch": round(best_rate(lambda: model.forward_batch(ids), residues, repeats), 1)}


def main() -> None:
    job = json.load(sys.stdin)
    model = esm_cpp.Model.load_from_safetensors(job["model"])
    tokenizer = esm_cpp.Tokenizer()
    ids = [np.asarray(tokenizer.encode(s), dtype=np.int32) for s in job["sequences"]]
    residues = sum(len(s) for s in job["sequences"])
    probe = [np.asarray(tokenizer.encode(s), dtype=np.int32) for s in job["probe"]]
    out = {"esm_cpp": esm_cpp.__version__, "isa": esm_cpp.current_isa(), "threads": model.num_threads}
    out["fp32"] = measure(model, ids, residues, job["repeats"])
    out["fp32_hidden"] = [model.forward_with_hidden_states(x)[1][-1].tolist() for x in probe]
    model.quantize_weights()
    out["int8"] = measure(model, ids, residues, job["repeats"])
    out["int8_hidden"] = [model.forward_with_hidden_states(x)[1][-1].tolist() for x in probe]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
