"""serving.batch on a real embedded Ray (Ray Data, token auth on): several input formats and
adapters, answers equal to the serving engine's, bad rows as error rows, refusals before any work,
and a worker process killed mid-job: every input row is still there exactly once per adapter."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bundles import make_bundle
from conftest import random_sequences
from modeling.base import load_base
from modeling.heads import REGRESSION, SEQUENCE_CLASS
from serving import batch
from serving.engine import Engine, EngineConfig

ROOT = Path(__file__).resolve().parent.parent
LONG = "M" + "A" * 1100


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("batch")
    base = load_base(str(tiny_base_dir))
    for name, kw in {"ss": {"rank": 4, "seed": 1}, "cls": {"rank": 2, "kind": SEQUENCE_CLASS, "seed": 2},
                     "stability": {"mode": "frozen", "kind": REGRESSION, "seed": 3}}.items():
        make_bundle(base, root / "adapters", name, **kw)
    seqs = random_sequences(24, 10, 60, seed=11)
    data = root / "in"
    (data / "more").mkdir(parents=True)
    (data / "a.fasta").write_text("".join(f">f{i} some description\n{s[:20]}\n{s[20:]}\n" for i, s in enumerate(seqs[:8]))
                                  + ">bad\nMKZJ\n>long\n" + LONG + "\n")
    (data / "b.csv").write_text("id,sequence,note\n" + "".join(f"c{i},{s},x\n" for i, s in enumerate(seqs[8:14])))
    (data / "more" / "c.tsv").write_text("sequence\n" + "".join(f"{s}\n" for s in seqs[14:18]))  # no id column
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(6)], "sequence": seqs[18:]}), data / "more" / "d.parquet")
    return root, base, seqs


def run_batch(root, tiny_base_dir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.batch", "--registry", str(root / "adapters"), "--base",
                           str(tiny_base_dir), *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_every_format_and_adapter_scored_like_the_service(job, tiny_base_dir):
    root, base, seqs = job
    out = root / "scores"
    run = run_batch(root, tiny_base_dir, "--adapter", "ss", "--adapter", "cls@1", "--adapter", "stability",
                    "--input", str(root / "in" / "a.fasta"), "--input", str(root / "in" / "more"),
                    "--input", str(root / "in" / "*.csv"), "--output", str(out), "--residue-probabilities")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 78 rows (3 adapters), 6 failed" in run.stdout, run.stdout
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 26 * 3 and len({(r["id"], r["adapter"]) for r in rows}) == 78
    meta = json.loads((out / "_job.json").read_text())
    assert meta["adapters"] == ["ss@1", "cls@1", "stability@1"] and meta["base"]["fingerprint"] == base.fingerprint
    errors = [r for r in rows if r["error"]]
    assert {r["id"] for r in errors} == {"bad", "long"}
    assert any("invalid residue 'J'" in r["error"] for r in errors) and any("--crop" in r["error"] for r in errors)
    engine = Engine(load_base(str(tiny_base_dir)), root / "adapters", EngineConfig(r_max=16))  # the service's engine
    good = [r for r in rows if not r["error"]]
    assert {r["sequence"] for r in good} == set(seqs)
    assert any(r["id"].startswith("c.tsv:") for r in good)  # no id column: file name and sequence hash
    expected = engine.predict([(r["adapter"], r["sequence"], True) for r in good])
    for row, want in zip(good, expected):
        assert row["kind"] == want.kind and row["length"] == len(row["sequence"]) and row["cropped"] is False
        if want.kind == "per_residue":
            assert row["labels"] == want.labels and row["label_names"] == ["H", "E", "C"]
            torch.testing.assert_close(torch.tensor(row["residue_probabilities"]),
                                       torch.tensor(want.residue_probabilities), atol=1e-5, rtol=0)
        elif want.kind == "regression":
            assert row["value"] == pytest.approx(want.value, abs=1e-5)
        else:
            assert row["label"] == want.label
            assert dict(zip(row["label_names"], row["probabilities"])) == pytest.approx(want.probabilities, abs=1e-5)


def test_a_killed_worker_loses_and_doubles_nothing(job, tiny_base_dir, tmp_path):
    """The worker process is killed after a few batches; Ray Data replaces it and retries what it
    had in hand. --crop: the over-long sequence is cropped, not failed."""
    root, _, _ = job
    seqs = random_sequences(200, 30, 80, seed=12)
    (tmp_path / "many.fasta").write_text("".join(f">k{i}\n{s}\n" for i, s in enumerate(seqs)) + f">long\n{LONG}\n")
    marks = tmp_path / "workers"
    marks.touch()
    proc = subprocess.Popen([sys.executable, "-m", "serving.batch", "--registry", str(root / "adapters"), "--base",
                             str(tiny_base_dir), "--adapter", "ss", "--adapter", "cls", "--input",
                             str(tmp_path / "many.fasta"), "--output", str(tmp_path / "out"), "--batch-sequences", "4",
                             "--crop"], cwd=ROOT, env=dict(os.environ, ESM_ADAPTERS_BATCH_WORKER_FILE=str(marks)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, deadline = None, time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        batches = [line.split()[0] for line in marks.read_text().splitlines() if line.endswith("batch")]
        if killed is None and len(batches) >= 3:  # mid-job: 3 of 51 batches done
            killed = int(batches[-1])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    workers = {int(line.split()[0]) for line in marks.read_text().splitlines()}
    assert killed in workers and len(workers) >= 2, (killed, workers)  # the job went on in a new worker
    rows = pq.read_table(tmp_path / "out").to_pylist()
    pairs = [(r["id"], r["adapter"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 201 * 2  # every row once per adapter
    assert all(not r["error"] for r in rows)
    assert {r["length"] for r in rows if r["id"] == "long"} == {1022} and all(r["cropped"] for r in rows if r["id"] == "long")


def test_bad_jobs_are_refused_before_any_work(job, tiny_base_dir, tmp_path, capsys):
    """In-process: a refusal starts no Ray at all."""
    root, _, _ = job

    def refused(*argv) -> str:
        assert batch.main(["--registry", str(root / "adapters"), "--input", str(root / "in" / "b.csv"), *argv]) == 2
        return capsys.readouterr().err

    out = ["--output", str(tmp_path / "o"), "--base", str(tiny_base_dir)]
    assert "--adapter missing: " in refused("--adapter", "missing", *out)
    assert "--adapter ss@7: " in refused("--adapter", "ss@7", *out)
    assert "give at least one --adapter" in refused(*out)
    assert "CPU only" in refused("--adapter", "ss", "--quantize", "int8", "--gpus-per-worker", "1", *out)
    assert "base fingerprint mismatch" in refused("--adapter", "ss", "--output", str(tmp_path / "o"))  # default base
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("keep me")
    taken = ["--adapter", "ss", "--output", str(tmp_path / "taken"), "--base", str(tiny_base_dir)]
    assert "exists; pass --overwrite" in refused(*taken)
    assert "did not write" in refused(*taken, "--overwrite")
    assert (tmp_path / "taken" / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "o").exists()
    import ray
    assert not ray.is_initialized()
    with pytest.raises(batch.BatchError, match="unknown format"):
        batch.input_files([str(root / "adapters" / "ss" / "1" / "manifest.json")])
