"""bench.peer's failure paths (the benchmark itself is run by hand: minutes, and a timing)."""
import os
import subprocess
import sys
from pathlib import Path

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
