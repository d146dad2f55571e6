"""The benchmarks' own parts: bench.peer's failure paths, the peers' answers, the launch counts
(the benchmarks themselves are run by hand: minutes, and timings)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_peer(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.peer", "--sequences", "4", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, **env))


def test_peer_that_cannot_be_installed_is_a_clear_error_not_a_traceback(tmp_path):
    # no index to install from: what a machine without PyPI (or without a wheel for esm.cpp) sees
    done = run_peer("--peer-venv", str(tmp_path / "venv"), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert "error: could not install esm-cpp==0.2.1" in done.stderr and "Traceback" not in done.stderr


def test_interpreter_without_esm_cpp_is_a_clear_error(tmp_path):
    done = run_peer("--peer-python", sys.executable)  # this project's own: no esm_cpp in it
    assert done.returncode == 2 and "error: esm.cpp failed" in done.stderr and "No module named 'esm_cpp'" in done.stderr
    missing = run_peer("--peer-python", str(tmp_path / "python"))
    assert missing.returncode == 2 and "no such interpreter" in missing.stderr and "Traceback" not in missing.stderr


def test_launch_count_does_not_grow_with_the_number_of_adapters_in_a_pass():
    """bench.launches at a tiny depth: a pass over 8 adapters launches what a pass over one does."""
    from bench.launches import main

    out = main(["--layers", "2", "--sequences", "24", "--adapters", "8"])
    assert out["serving_mixed"] == out["serving_unmerged_1"] > out["serving_merged_1"] > 0
    assert out["train_step_lora"] > 0 and out["train_step_full"] > 0


def test_a_training_step_never_makes_the_host_wait_so_a_cuda_graph_can_capture_it():
    """bench.train's step (what GraphedStepper captures on a GPU), lora and full: no value read back,
    no data-dependent shape. The detector is checked on the two waits the step used to have."""
    import torch

    from bench.gpu_check import random_base
    from bench.train import real_batches, stepper_for
    from modeling.cuda_graphs import HostSyncs
    from modeling.encoder import EncoderShape
    from modeling.heads import residues

    tokens = real_batches(1, 2, 24)[0]
    for mode in ("lora", "full"):
        stepper = stepper_for(random_base(EncoderShape(2, 32, 4), 0).encoder, mode, 4, autocast=torch.bfloat16)
        with HostSyncs() as syncs:
            stepper.backward(tokens)
        assert syncs.found == [], mode
    with HostSyncs() as syncs:
        out, mask = stepper.model(tokens)
        out[mask]  # the old loss's selection of real residues
        residues(stepper.model.encoder(tokens), mask.sum(-1))  # the width read back from the lengths
    assert syncs.found == ["aten.index.Tensor", "aten._local_scalar_dense.default"]


def test_cold_load_bench_loads_each_adapter_both_ways_and_restores_the_digest_pool():
    from bench.cold_load import main
    from modeling import bundle

    pool = bundle._HASHERS
    out = main(["--adapters", "2", "--layers", "2", "--width", "64", "--rank", "4"])
    assert bundle._HASHERS is pool
    assert out["cold_load_ms"]["sequential"] > 0 and out["cold_load_ms"]["overlapped"] > 0


def test_the_hugging_face_peers_answer_as_the_engine(tiny_base_dir, tmp_path):
    """bench.hf_peers holds the same weights: transformers' EsmModel gives our encoder's
    representations, and peft's mixed-adapter batches give the engine's answers, so the ratios
    against them compare speed only."""
    import torch

    from bench.hf_peers import HfPeftMixed, hf_esm
    from bundles import make_bundle
    from conftest import random_sequences
    from modeling.alphabet import PAD, tokenize
    from modeling.base import load_base
    from modeling.heads import PER_RESIDUE, SEQUENCE_CLASS
    from modeling.lora import LoraSpec
    from serving.engine import Engine, EngineConfig

    base, registry = load_base(str(tiny_base_dir)), tmp_path / "adapters"
    names = [f"a{i}" for i in range(3)]
    for i, name in enumerate(names):
        make_bundle(base, registry, name, kind=(PER_RESIDUE, SEQUENCE_CLASS)[i % 2], spec=LoraSpec(rank=2 + i), seed=i)
    sequences = random_sequences(9, 5, 40, seed=1)
    requests = [(names[i % 3], s) for i, s in enumerate(sequences)]
    tokens = tokenize(sequences)
    with torch.no_grad():
        theirs = hf_esm(base.encoder, "cpu", torch.float32)(input_ids=tokens, attention_mask=tokens.ne(PAD))
        ours = base.encoder(tokens)
    torch.testing.assert_close(theirs.last_hidden_state[tokens.ne(PAD)], ours[tokens.ne(PAD)], atol=1e-4, rtol=0)
    peer = HfPeftMixed(hf_esm(base.encoder, "cpu", torch.float32), registry, names).outputs(requests, batch=4)
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8))
    for answer, result in zip(peer, engine.predict([(n, s, True) for n, s in requests])):
        if result.kind == PER_RESIDUE:
            torch.testing.assert_close(answer.softmax(-1), torch.tensor(result.residue_probabilities), atol=1e-4, rtol=0)
        else:
            assert answer.softmax(-1).tolist() == pytest.approx(list(result.probabilities.values()), abs=1e-4)
