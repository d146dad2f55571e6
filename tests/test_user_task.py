"""A user's own task, declared only in yaml over files the test writes: trained on the tiny base,
published, evaluated and served over real gRPC exactly like a built-in task. And the same through
BioNeMo's keys, through flags, and a refused run that publishes nothing."""
import random

import pytest

from conftest import STANDARD, free_port
from modeling import bundle as bundles
from modeling import registry as store
from serving import client, serve as service
from training import evaluate, fit
from training.run import run

BINDING = """\
name: my-binding
kind: per_residue
description: residues that bind my ligand
sequence_column: protein
label_column: binds
mask_column: observed
metric: mcc
"""


def binding_rows(n: int, seed: int, extra_column: bool = False) -> str:
    """id,protein,binds,observed (and a 3state column that must not matter)."""
    rng = random.Random(seed)
    lines = ["id,protein,binds,observed" + (",3state" if extra_column else "")]
    for i in range(n):
        seq = "".join(rng.choice(STANDARD) for _ in range(rng.randint(15, 30)))
        binds = "".join("1" if c in "CHDE" else "0" for c in seq)  # learnable: binding residues are C/H/D/E
        observed = "0" + "1" * (len(seq) - 1)
        lines.append(f"p{seed}-{i},{seq},{binds},{observed}" + (f",{'C' * len(seq)}" if extra_column else ""))
    return "\n".join(lines) + "\n"


def bionemo_config(root, tiny_base_dir):
    """The same kind of task declared only with BioNeMo's keys, over BioNeMo's file layout."""
    for split, seed in (("train", 4), ("val", 5), ("test", 6)):
        (root / "flip" / split).mkdir(parents=True, exist_ok=True)
        (root / "flip" / split / "x000.csv").write_text(binding_rows(24 if split == "train" else 6, seed))
    config = root / "downstream_binding.yaml"
    config.write_text(f"""
name: binding-bionemo
trainer: {{max_steps: 4}}
model:
  restore_encoder_path: {tiny_base_dir}
  micro_batch_size: 8
  peft: {{lora_tuning: {{adapter_dim: 2}}}}
  data:
    task_name: binding
    task_type: token-level-classification
    sequence_column: protein
    target_column: [binds]
    target_sizes: [2]
    mask_column: [observed]
    dataset_path: {root / "flip"}
    dataset: {{train: x000, val: x000, test: x000}}
""")
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("user_task")
    for split, (n, seed) in {"train": (40, 1), "val": (8, 2), "test": (8, 3)}.items():
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{split}.csv").write_text(binding_rows(n, seed, extra_column=True))
    task_file = root / "binding.yaml"
    task_file.write_text(BINDING)
    argv = ["--task-file", str(task_file), "--base", str(tiny_base_dir), "--data-dir", str(root / "data"),
            "--registry", str(root / "adapters"), "--run-dir", str(root / "runs"), "--rank", "4",
            "--max-steps", "8", "--batch-size", "8"]
    summary = run(fit.parse_args(argv))
    run(fit.parse_args(["--config", str(bionemo_config(root, tiny_base_dir)), "--registry", str(root / "adapters"),
                            "--run-dir", str(root / "runs")]))
    return root, summary


def test_a_yaml_task_trains_publishes_and_evaluates(trained):
    root, summary = trained
    assert summary["task"] == "my-binding" and summary["labels"] == ["0", "1"]  # inferred from train
    folder = root / "adapters" / "my-binding-r4" / "1"
    manifest = bundles.read_manifest(folder)
    assert manifest["task"] == "my-binding" and manifest["output"] == {"kind": "per_residue", "labels": ["0", "1"]}
    assert manifest["task_spec"]["label_column"] == "binds" and manifest["task_spec"]["labels"] == ["0", "1"]
    assert "mcc" in manifest["metrics"]["test"] and "f1" in manifest["metrics"]["test"]["per_class"]["1"]
    result = evaluate.evaluate(str(folder), root / "data" / "test.csv")  # the task comes from the manifest
    assert result["task"] == "my-binding" and result["residues"] == sum(
        len(line.split(",")[1]) - 1 for line in (root / "data" / "test.csv").read_text().splitlines()[1:])


def test_a_yaml_task_is_served_over_grpc_like_a_builtin(trained, tiny_base_dir):
    root, _ = trained
    grpc_port = free_port()
    listed = service.start({"registry": str(root / "adapters"), "base": str(tiny_base_dir), "r_max": 8},
                           grpc_port, free_port(), num_cpus=0.5, ray_cpus=2, http_port=free_port())
    try:
        for name, task in (("my-binding-r4", "my-binding"), ("binding-bionemo", "binding")):  # yaml, BioNeMo keys
            entry = next(a for a in listed.adapters if a.name == name)
            assert entry.status == "ok" and entry.task == task and entry.kind == "per_residue"
            assert list(entry.labels) == ["0", "1"]
            sequence = "MKCHDEAAGLLV"
            response = client.predict(f"127.0.0.1:{grpc_port}", name, [sequence], probabilities=True)
            prediction = response.predictions[0]
            assert response.adapter == f"{name}@1" and response.kind == "per_residue"
            assert len(prediction.labels) == len(sequence) and set(prediction.labels) <= {"0", "1"}
            assert all(len(p.values) == 2 for p in prediction.residue_probabilities)
    finally:
        service.stop()


def test_bionemo_keys_declare_train_publish_and_evaluate_a_task(trained):
    root, _ = trained
    folder = root / "adapters" / "binding-bionemo" / "1"
    manifest = bundles.read_manifest(folder)
    assert manifest["task"] == "binding" and manifest["task_spec"]["mask_column"] == "observed"
    assert manifest["task_spec"]["sequence_column"] == "protein" and manifest["metrics"]["test"]["sequences"] == 6
    result = evaluate.evaluate(str(folder), root / "flip" / "test" / "x000.csv")
    assert result["task"] == "binding" and result["sequences"] == 6
    config = root / "downstream_binding.yaml"
    code = fit.main(["--config", str(config), "--registry", str(root / "adapters"), "--run-dir", str(root / "runs"),
                     "model.data.num_classes=3", "model.data.target_sizes=null"])
    assert code == 2 and store.versions(root / "adapters", "binding-bionemo") == [1]  # refused, nothing new


def test_flags_declare_a_sequence_task_with_inferred_classes(tmp_path, tiny_base_dir):
    rng = random.Random(7)
    rows = ["sequence,soluble,set"]
    for i in range(30):
        seq = "".join(rng.choice(STANDARD) for _ in range(20))
        rows.append(f"{seq},{'yes' if seq.count('K') > 1 else 'no'},{'test' if i >= 26 else 'train'}")
    (tmp_path / "sol.csv").write_text("\n".join(rows) + "\n")
    summary = run(fit.parse_args([
        "--task", "solubility", "--kind", "sequence_class", "--label-column", "soluble", "--base", str(tiny_base_dir),
        "--data-dir", str(tmp_path / "sol.csv"), "--registry", str(tmp_path / "reg"), "--run-dir", str(tmp_path / "r"),
        "--rank", "2", "--max-steps", "3"]))
    manifest = bundles.read_manifest(tmp_path / "reg" / "solubility-r2" / "1")
    assert summary["labels"] == ["no", "yes"] and manifest["output"]["labels"] == ["no", "yes"]


def test_a_refused_run_names_the_row_and_publishes_nothing(tmp_path, tiny_base_dir, capsys):
    (tmp_path / "t.yaml").write_text(BINDING.replace("kind: per_residue", "kind: per_residue\nlabels: ['0', '1']"))
    data = binding_rows(12, 8).splitlines()
    data[5] = data[5].rsplit(",", 2)[0] + ",2" + "0" * (len(data[5].split(",")[1]) - 1) + "," + data[5].split(",")[3]
    (tmp_path / "bad.csv").write_text("\n".join(data) + "\n")
    code = fit.main(["--task-file", str(tmp_path / "t.yaml"), "--base", str(tiny_base_dir), "--data-dir",
                     str(tmp_path / "bad.csv"), "--registry", str(tmp_path / "reg"), "--run-dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"bad.csv: row {data[5].split(',')[0]}: labels ['2'] are not in 01" in err, err
    assert not (tmp_path / "reg").exists() or not store.versions(tmp_path / "reg", "my-binding-r16")


def test_list_tasks_shows_every_task(capsys):
    assert fit.main(["--list-tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("sec_str", "bind", "bind_any", "conservation", "aav", "sav"):
        assert f"\n{name} " in out
    assert "macro_f1" in out and "from data" in out  # sav infers its classes
