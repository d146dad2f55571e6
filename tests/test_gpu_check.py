"""The GPU check cannot rot between GPU runs: its smoke mode runs every part on CPU, tiny shapes."""
import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_runs_every_part_and_passes(tmp_path):
    out = tmp_path / "check.json"
    # budgets x 20: the smoke takes seconds; on a loaded machine a budget must not decide it
    report = gpu_check.main(["--smoke", "--out", str(out), "--budget-scale", "20"], watchdog=False)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    assert list(report["parts"]) == list(gpu_check.SMOKE.parts) and set(gpu_check.SMOKE.parts) == set(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "pass", (name, part)
    assert report["status"] == "pass"
    correctness = report["parts"]["correctness"]
    for size in ("8M", "650M"):
        for key in ("float32", "bfloat16", "float32_packed", "bfloat16_packed", "float32_merged_vs_unmerged",
                    "bfloat16_merged_vs_cpu", "float32_embed"):
            assert correctness[size][key]["compared"] > 0 and correctness[size][key]["mismatches"] == 0
    stress = report["parts"]["stress"]
    assert stress["evictions"] > 0 and stress["requests"] > 0 and stress["wrong_answers"] == 0
    for dtype in ("float32", "bfloat16"):
        served = report["parts"]["serving_650M"][dtype]
        assert {"naive_peft_8", "peft_mixed_batch_8", "transformers_esm_merged_1", "over_peft_mixed_batch",
                "over_transformers_esm", "merged_residues_per_s", "packed_over_padded"} <= set(served)
        for variant in ("packed", "padded"):
            assert {"merged_1", "mixed_8", "mixed_10", "online_8_mixed_8"} <= set(served[variant])
        assert served["packed"]["padding_fraction"] == 0 <= served["padded"]["padding_fraction"]  # smoke: 40-residue cuts
        assert 0 < served["adapter_read_ms"] <= served["adapter_load_ms"] and served["adapter_load_ms_checksums_first"] > 0
    assert report["parts"]["serving_650M"]["flop_per_residue"] > 0
    assert report["parts"]["training"]["lora_trainable_parameters"] < report["parts"]["training"][
        "full_trainable_parameters"]
    fitted = report["parts"]["fit"]  # training.fit -> evaluate -> engine, the product's own path
    assert fitted["fit"]["scored_on"] == "cpu" and fitted["evaluate_q3"] == {"cpu": fitted["fit"]["test_q3"]}
    assert fitted["served_device_vs_cpu"]["compared"] > 0 and fitted["wrong_answers"] == 0
    served = report["parts"]["serving_graphed"]
    assert served["graphs"] is False  # a CPU: both engines eager, and the report says so
    assert served["stress"]["evictions"] > 0 and served["wrong_answers"] == 0
    for size in ("8M", "650M"):
        assert served[size]["graphed_vs_eager"]["compared"] == 24 and served[size]["graphed_vs_eager"]["mismatches"] == 0
        assert {"eager_merged_1", "graphed_mixed_8", "graphed_over_eager_mixed_8"} <= set(served[size])
    graphed = report["parts"]["training_graphed"]
    assert graphed["lora_host_syncs"] == graphed["full_host_syncs"] == 0
    assert graphed["graphs"].startswith("not run")  # a CPU: said, not passed off as measured


def test_a_part_out_of_time_is_reported_incomplete_never_as_a_pass():
    report = gpu_check.main(["--smoke", "--budget-scale", "0", "--parts", "environment,correctness"], watchdog=False)
    assert {part["status"] for part in report["parts"].values()} == {"incomplete"}
    assert report["status"] == "incomplete"
    assert report["goals"]["wrong_answers"]["met"] == "smoke run: not judged"
    assert report["goals"]["wrong_answers"]["value"] is None  # unmeasured, not zero


def test_a_wrong_answer_fails_the_comparison():
    from serving.engine import Prediction
    want = Prediction("a@1", "sequence_class", label="x", probabilities={"x": 0.6, "y": 0.4})
    close = Prediction("a@1", "sequence_class", label="x", probabilities={"x": 0.60005, "y": 0.39995})
    flipped = Prediction("a@1", "sequence_class", label="y", probabilities={"x": 0.4, "y": 0.6})
    assert gpu_check.compare([want, want], [close, flipped], 1e-4)["mismatches"] == 1
    assert gpu_check.compare([want], [RuntimeError("boom")], 1e-4)["errors"] == 1
    import torch
    states = [torch.ones(5, 8)]
    assert gpu_check.compare_embeddings(states, [states[0] + 1e-6])["mismatches"] == 0
    assert gpu_check.compare_embeddings(states, [states[0] * 1.001])["mismatches"] == 1
    assert gpu_check.compare_embeddings(states, [states[0] * float("nan")])["mismatches"] == 1


def test_the_global_limit_ends_the_run_with_what_it_measured(tmp_path):
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--overall-s", "1", "--out", str(out),
                          "--parts", "environment,correctness,stress,serving_8M"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert report["parts"]["environment"]["status"] == "pass"
    cut = [part for part in report["parts"].values() if part["status"] == "incomplete"]
    assert len(cut) == 1 and cut[0]["stopped_at"] == "the global time limit"
    assert report["status"] == "incomplete"
