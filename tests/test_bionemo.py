"""BioNeMo v1.8's four downstream files run unchanged, in BioNeMo's own command form, given only
the data and the base on the command line. The files are the tests' copies (tests/data/bionemo_v1:
BioNeMo's keys and values, composed over pretrain_esm2_650M and base_config as BioNeMo composes them);
the data is small, in BioNeMo's layout (<dataset_path>/{train,val,test}/x000.csv); the base is a
tiny random ESM-2, so the files' 650M architecture keys are reported as overridden by it."""
from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest

from conftest import STANDARD
from modeling import bundle as bundles
from training import fit
from training.tasks import TASKS

BIONEMO = Path(__file__).resolve().parent / "data" / "bionemo_v1"


def rows(task: str, n: int, rng: random.Random) -> str:
    """A small CSV with the columns the file's model.data keys name."""
    lines = {"sec_str": ["id,sequence,3state,resolved"], "scl": ["id,sequence,scl_label"],
             "meltome": ["id,sequence,target"]}[task]
    for i in range(n):
        seq = "".join(rng.choice(STANDARD) for _ in range(rng.randint(12, 30)))
        if task == "sec_str":
            lines.append(f"p{i},{seq},{''.join('H' if c in 'AELM' else 'E' if c in 'VIY' else 'C' for c in seq)},"
                         f"0{'1' * (len(seq) - 1)}")
        elif task == "scl":
            lines.append(f'p{i},{seq},"{TASKS["scl"].labels[i % 10]}"')
        else:
            lines.append(f"p{i},{seq},{40 + 10 * seq.count('C') / len(seq):.3f}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name, task, mode, kind", [
    ("downstream_sec_str_LORA", "sec_str", "lora", "per_residue"),
    ("downstream_flip_sec_str", "sec_str", "frozen", "per_residue"),
    ("downstream_flip_scl", "scl", "frozen", "sequence_class"),
    ("downstream_flip_meltome", "meltome", "frozen", "regression"),
])
def test_a_bionemo_downstream_file_runs_unchanged(name, task, mode, kind, tmp_path, tiny_base_dir, monkeypatch, capsys):
    rng = random.Random(name)
    data = tmp_path / "FLIP" / task
    for split, n in (("train", 20), ("val", 6), ("test", 6)):
        (data / split).mkdir(parents=True)
        (data / split / "x000.csv").write_text(rows(task, n, rng))
    monkeypatch.chdir(tmp_path)  # BioNeMo's files name no registry or run folder: ./adapters, ./runs
    monkeypatch.delenv("BIONEMO_HOME", raising=False)  # the files' ${oc.env:BIONEMO_HOME} keys are overridden or unused
    code = fit.main([f"--config-path={BIONEMO}", f"--config-name={name}",
                     f"model.data.dataset_path={data}", f"model.restore_encoder_path={tiny_base_dir}"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    summary = json.loads(out.out[out.out.index("{"):])
    assert summary["mode"] == mode and summary["task"] == task
    manifest = bundles.read_manifest(Path(summary["published"]))
    assert manifest["name"] == "esm2nv_flip" and manifest["output"]["kind"] == kind and "test" in manifest["metrics"]
    config = manifest["training"]["config"]
    assert config["model"]["data"]["dataset"] == {"train": "x000", "val": "x000", "test": "x000"}
    assert config["trainer"]["val_check_interval"] == 20 and config["seed"] == 1234
    assert summary["ignored_keys"] > 100 and len(config["notes"]["ignored"]) == summary["ignored_keys"]
    assert any("model.num_layers=33 overridden by the checkpoint (2" in line
               for line in summary["overridden_by_checkpoint"])
    head = manifest["head"]
    assert head["hidden"] == {"sec_str": 32, "scl": 256, "meltome": 128}[task]  # cnn_dim / hidden_layer_size
    assert head["dropout"] == {"sec_str": 0.25, "scl": 0.1, "meltome": 0.1}[task]
    assert "train/loss" in (Path(summary["run_dir"]) / "metrics.csv").read_text()
    if task == "scl":  # base_config's modify_percent 0.15 reaches scl (its file does not set it)
        assert config["model"]["data"]["modify_percent"] == 0.15


def test_an_unset_variable_in_a_key_that_is_used_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BIONEMO_HOME", raising=False)
    code = fit.main([f"--config-path={BIONEMO}", "--config-name=downstream_flip_scl", f"model.data.dataset_path={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "BIONEMO_HOME" in err and "model.restore_encoder_path" in err and "command line" in err


def test_a_nemo_checkpoint_is_refused_naming_what_to_pass_instead(tmp_path, capsys):
    nemo = tmp_path / "esm2nv_650M_converted.nemo"
    with tarfile.open(nemo, "w") as tar:  # BioNeMo's layout: a tar of the yaml and the weights
        for part in ("model_config.yaml", "model_weights.ckpt"):
            (tmp_path / part).write_text("x")
            tar.add(tmp_path / part, arcname=part)
    code = fit.main([f"--config-path={BIONEMO}", "--config-name=downstream_sec_str_LORA",
                     f"model.data.dataset_path={tmp_path}", f"model.restore_encoder_path={nemo}"])
    assert code == 2
    err = capsys.readouterr().err
    assert ".nemo checkpoint is not read here" in err and "esm2_t33_650M_UR50D" in err
