"""The engine side by side with esm.cpp, the strongest CPU peer: prints one JSON object.

  python -m bench.peer [--sequences 256] [--peer-python PATH | --peer-venv .peer-venv] [--base ...]

The same weights (the base written as a Hugging Face model.safetensors, plus a small random LM head
that esm.cpp insists on computing) and the same real sequences as bench.engine (FLIP sec_str
val+test, 50-500 residues, seed 0). esm.cpp needs numpy < 2 and this project pins numpy 2, so it
runs in an interpreter of its own: --peer-python, or a virtual environment this benchmark creates
(`pip install esm-cpp==0.2.1 "numpy<2"`) at --peer-venv. Never a project dependency.

Ours: 64 rank-16 adapters mixed in every batch (float32 and int8), one merged adapter (float32 and
int8), and the naive fair-esm + peft loop; esm.cpp: base only, float32 and INT8 (its
quantize_weights), forward_scheduled and forward_batch; ratios against the better of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.engine import NaivePeft, publish_random_adapters, sequences, throughput
from modeling.alphabet import tokenize
from modeling.base import load_base, save_hf_folder
from modeling.encoder import stock_fair_esm
from serving.engine import Engine, EngineConfig

PEER = ["esm-cpp==0.2.1", "numpy<2"]
SHORT = "MKTAYIAKQRQISFVKSHFSRQ"
WORKER = Path(__file__).with_name("peer_worker.py")


class PeerUnavailable(RuntimeError):
    pass


def peer_python(venv: Path) -> Path:
    """esm.cpp's interpreter: the venv at `venv`, created and filled on first use."""
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)], f"could not create a virtual environment at {venv}")
    probe = subprocess.run([str(python), "-c", "import esm_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        run([str(python), "-m", "pip", "install", "--quiet", *PEER],
            f"could not install {' '.join(PEER)} into {venv} (it needs the package index and a wheel or "
            f"a C++ toolchain for this platform; or pass --peer-python, an interpreter that has it)")
    return python


def run(command: list[str], message: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PeerUnavailable(f"{message}:\n{(done.stdout + done.stderr).strip()[-2000:]}")


def lm_head(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """EsmForMaskedLM's LM head, random (esm.cpp wants one; nobody reads it), tied to the embedding."""
    dim, vocab = encoder.embed_dim, encoder.embed_tokens.weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    return {"lm_head.dense.weight": torch.randn(dim, dim, generator=generator) * 0.02,
            "lm_head.dense.bias": torch.zeros(dim), "lm_head.layer_norm.weight": torch.ones(dim),
            "lm_head.layer_norm.bias": torch.zeros(dim), "lm_head.decoder.weight": encoder.embed_tokens.weight,
            "lm_head.bias": torch.zeros(vocab)}


def run_peer(python: Path, model: Path, seqs: list[str], probe: list[str], repeats: int, threads: int) -> dict:
    job = json.dumps({"model": str(model), "sequences": seqs, "probe": probe, "repeats": repeats})
    env = dict(os.environ, ESM_NUM_THREADS=str(threads))  # as many threads as torch uses here
    done = subprocess.run([str(python), str(WORKER)], input=job, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise PeerUnavailable(f"esm.cpp failed on the benchmark:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def relative_error(reference: list, other: list) -> float | str:
    """||other - reference|| / ||reference|| over the probe sequences' final hidden states."""
    ref = torch.cat([torch.as_tensor(r).flatten() for r in reference])
    out = torch.cat([torch.as_tensor(o).flatten() for o in other])
    error = float((out - ref).norm() / ref.norm())
    return round(error, 5) if error == error else "nan"  # JSON has no NaN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per figure (best taken)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--base")
    parser.add_argument("--peer-python", type=Path, help="an interpreter that has esm_cpp (numpy < 2)")
    parser.add_argument("--peer-venv", type=Path, default=Path(".peer-venv"),
                        help="where to create esm.cpp's own virtual environment (default .peer-venv)")
    args = parser.parse_args(argv)
    try:
        out = compare(args)
    except PeerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


def compare(args: argparse.Namespace) -> dict:
    threads = torch.get_num_threads()
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                            f"({threads} threads)", "sequences": args.sequences, "rank": args.rank}
    # the peer's interpreter first: where esm.cpp cannot run, say so before any work
    python = args.peer_python or peer_python(args.peer_venv)
    if not Path(python).exists():
        raise PeerUnavailable(f"--peer-python {python}: no such interpreter")
    base = load_base(args.base)
    out["base"] = base.name
    seqs = sorted(sequences(args.sequences, args.seed), key=len)
    # The accuracy check: a short sequence proves the weights transferred (esm.cpp 0.2.1 gets it right),
    # four lengths across the benchmark's range show what esm.cpp answers on the measured work.
    probe = [SHORT] + seqs[:: max(1, len(seqs) // 4)][:4]
    with tempfile.TemporaryDirectory() as tmp:
        model = save_hf_folder(base.encoder, Path(tmp), extra=lm_head(base.encoder)) / "model.safetensors"
        peer = run_peer(python, model, seqs, probe, args.repeats, threads)
    out["esm_cpp"] = {k: v for k, v in peer.items() if not k.endswith("hidden")}
    with torch.no_grad():  # the same function: esm.cpp's float32 states against our encoder's
        ours = [base.encoder(tokenize([s]))[0] for s in probe]
    differences = [float((torch.tensor(h) - o).abs().max()) for h, o in zip(peer["fp32_hidden"], ours)]
    if not differences[0] <= 1e-3:  # NaN included
        raise PeerUnavailable(f"esm.cpp does not compute our encoder's function on a {len(SHORT)}-residue "
                              f"sequence (max difference {differences[0]}): the weights did not transfer")
    out["esm_cpp_fp32_max_abs_diff"] = {len(s): d if d == d else "nan" for s, d in zip(probe, differences)}
    out["esm_cpp_fp32_wrong_probes"] = sum(not d <= 1e-3 for d in differences[1:])  # of len(probe) - 1

    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "adapters"
        names = publish_random_adapters(base, registry, 64, args.rank)
        mixed = [(names[i % 64], s) for i, s in enumerate(seqs)]  # adapters along the sorted order:
        one = [(names[0], s) for s in seqs]                        # every batch mixes them all
        config = dict(r_max=args.rank, max_device_adapters=64, max_batch_size=64)
        for quantize in ("none", "int8"):
            engine = Engine(load_base(args.base), registry, EngineConfig(**config, quantize=quantize))
            out[f"mixed_64_{quantize}"] = throughput(engine, mixed, args.repeats)
            merged = Engine(load_base(args.base), registry, EngineConfig(**config, quantize=quantize, merged=(names[0],)))
            out[f"merged_1_{quantize}"] = throughput(merged, one, args.repeats)
            with torch.no_grad():  # our int8 base's accuracy, measured as esm.cpp's is
                states = [engine.encoder(tokenize([s]))[0] for s in probe]
            out[f"hidden_relative_error_{quantize}"] = relative_error(ours, states)
            short_int8 = states[:1]
        out["naive_peft_64"] = NaivePeft(stock_fair_esm(base.encoder), registry, names).serve(mixed, batch=64)
    out["esm_cpp_int8_hidden_relative_error"] = relative_error(ours, peer["int8_hidden"])
    # on the short sequence, where esm.cpp's float32 is right, the two INT8 bases' errors compare
    out["short_hidden_relative_error_int8"] = {"ours": relative_error(ours[:1], short_int8),
                                               "esm_cpp": relative_error(ours[:1], peer["int8_hidden"][:1])}

    def rate(key: str) -> float:
        return out[key]["residues_per_s"]

    def peer_rate(precision: str) -> float:
        return max(peer[precision].values())

    out["ratios"] = {
        "int8_mixed64_over_esm_cpp_int8": round(rate("mixed_64_int8") / peer_rate("int8"), 3),  # goal >= 1.0
        "fp32_mixed64_over_esm_cpp_fp32": round(rate("mixed_64_none") / peer_rate("fp32"), 3),  # goal >= 1.3
        "mixed64_over_naive": round(rate("mixed_64_none") / rate("naive_peft_64"), 3),  # goal >= 4
        "int8_mixed64_over_int8_merged": round(rate("mixed_64_int8") / rate("merged_1_int8"), 3),  # goal >= 0.85
        "int8_over_fp32_mixed64": round(rate("mixed_64_int8") / rate("mixed_64_none"), 3),
    }
    return out


if __name__ == "__main__":
    sys.exit(main())
