"""Two-process DDP on CPU (gloo), for real, launched by Lightning and by Ray Train (2 workers on a
local, token-authenticated Ray): one bundle is published, and the validation metric that
checkpointing watched is the metric over the whole validation split (every rank scores a share of
it; the shares are gathered), equal to the published model's own score on that split."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from modeling import registry as store
from training import evaluate

ROOT = Path(__file__).resolve().parent.parent


LAUNCHERS = {"lightning": ["--devices", "2", "--strategy", "ddp", "trainer.accelerator=cpu"],
             "ray-train": ["--ray-workers", "2"]}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_process_ddp_publishes_once_with_the_whole_split_metric(tmp_path, tiny_base_dir, sec_str_csv, launcher):
    run = subprocess.run(
        [sys.executable, "-m", "training.fit", "--base", str(tiny_base_dir), "--data-dir", str(sec_str_csv),
         "--registry", str(tmp_path / "reg"), "--run-dir", str(tmp_path / "runs"), "--rank", "2", "--max-steps", "4",
         "--batch-size", "4", *LAUNCHERS[launcher]],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Starting with 2 processes" in run.stderr + run.stdout or launcher == "ray-train"
    assert store.versions(tmp_path / "reg", "sec_str-r2") == [1] == [store.high_water(tmp_path / "reg", "sec_str-r2")]  # published once
    folder = tmp_path / "reg" / "sec_str-r2" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    monitored = manifest["training"]["monitored"]
    assert monitored["world_size"] == 2 and monitored["metric"] == "val/q3"
    val = tmp_path / "val.csv"  # the validation split the run used: rows marked validation=True
    lines = sec_str_csv.read_text().splitlines()
    val.write_text("\n".join([lines[0]] + [line for line in lines[1:] if line.endswith(",train,True")]) + "\n")
    whole = evaluate.evaluate(str(folder), val)
    assert whole["sequences"] == 5
    assert monitored["best"] == pytest.approx(whole["q3"], abs=1e-6)
    assert manifest["metrics"]["val"]["q3"] == pytest.approx(whole["q3"], abs=1e-9)
