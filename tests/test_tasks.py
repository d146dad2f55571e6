"""Tasks are data: declarations, BioNeMo's keys, label sets, FLIP splits and the FLIP cache."""
import hashlib
import zipfile

import numpy as np
import pytest

from training import flip, metrics
from training.config import ConfigError, load_config
from training.data import DataError, load_splits, read_file, settle_labels
from training.fit import parse_args
from training.task_config import data_files, expand_stems, expected_classes, resolve_task
from training.tasks import TASKS, TaskError, task_from_dict


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_builtin_declarations_round_trip_through_their_dict_form():
    assert {"sec_str", "sec_str8", "scl", "meltome", "gb1", "aav", "sav", "bind", "bind_any", "conservation"} <= set(TASKS)
    for task in TASKS.values():
        again = task_from_dict(task.as_dict(), task.source)
        assert again == task, task.name


@pytest.mark.parametrize("declaration, message", [
    ({"name": "t", "kind": "per_residue", "lables": ["a", "b"]}, "unknown task key 'lables'; did you mean 'labels'"),
    ({"name": "t"}, "needs 'kind'"),
    ({"name": "t", "kind": "ranking"}, "kind 'ranking' is not one of"),
    ({"name": "t", "kind": "per_residue", "labels": ["10", "20"]}, "one character each"),
    ({"name": "t", "kind": "sequence_class", "labels": ["only"]}, "at least two labels"),
    ({"name": "t", "kind": "sequence_class", "labels": ["a", "a"]}, "repeat a label"),
    ({"name": "t", "kind": "sequence_class", "metric": "mse"}, "metric 'mse' for a sequence_class task"),
    ({"name": "t", "kind": "per_residue", "metric": "within_one"}, "needs ordered: true"),
    ({"name": "t", "kind": "per_residue", "labels": ["0", "1"], "label_aliases": {"2": "7"}}, r"map to \['7'\]"),
    ({"name": "t", "kind": "regression", "mask_column": "m"}, "mask_column only applies to per-residue"),
    ({"name": "t", "kind": "regression", "labels": ["a", "b"]}, "a regression task has no labels"),
    ({"name": "../up", "kind": "regression"}, "name must be"),
])
def test_bad_declarations_say_what_is_wrong(declaration, message):
    with pytest.raises(TaskError, match=message):
        task_from_dict(declaration, "my_task.yaml")


def test_a_task_declared_with_flags():
    config = parse_args(["--task", "my-binding", "--kind", "per_residue", "--label-column", "bind", "--labels", "0,1",
                         "--mask-column", "scored", "--metric", "mcc"])
    task = resolve_task(config)
    assert (task.name, task.kind, task.labels, task.label_column, task.mask_column, task.metric) == (
        "my-binding", "per_residue", ("0", "1"), "bind", "scored", "mcc")


def test_an_unknown_task_without_a_kind_says_how_to_declare_one():
    with pytest.raises(ConfigError, match="unknown task 'my-thing': declare it with --kind"):
        resolve_task(parse_args(["--task", "my-thing"]))


def test_a_task_file_and_flags_that_change_a_builtin(tmp_path):
    path = write(tmp_path / "t.yaml", "name: solubility\nkind: sequence_class\nlabel_column: soluble\n")
    task = resolve_task(parse_args(["--task-file", str(path)]))
    assert (task.name, task.labels, task.metric) == ("solubility", (), "accuracy")  # labels from the data
    with pytest.raises(ConfigError, match="declares task 'solubility'"):
        resolve_task(parse_args(["--task-file", str(path), "--task", "other"]))
    assert resolve_task(parse_args(["--task", "bind", "--split", "one_vs_many"])).split == "one_vs_many"


def test_bionemo_keys_declare_a_task_and_its_files(tmp_path):
    for split in ("train", "val", "test"):
        write(tmp_path / "data" / split / "x000.csv", "id,seq,bind\n")
    write(tmp_path / "data" / "test" / "x001.csv", "id,seq,bind\n")
    config_file = write(tmp_path / "c.yaml", f"""
model:
  data:
    task_name: my_binding
    task_type: token-level-classification
    sequence_column: seq
    target_column: [bind]
    target_sizes: [2]
    mask_column: [null]
    dataset_path: {tmp_path / "data"}
    dataset: {{train: x000, val: x000, test: "x[000..001]"}}
""")
    config = load_config(config_file)
    task = resolve_task(config)
    assert (task.name, task.kind, task.sequence_column, task.label_column, task.mask_column) == (
        "my_binding", "per_residue", "seq", "bind", None)
    assert expected_classes(config) == 2
    files = data_files(config)
    assert [p.name for p in files["test"]] == ["x000.csv", "x001.csv"] and files["train"][0].parent.name == "train"
    assert expand_stems("x[008..011]") == ["x008", "x009", "x010", "x011"]


def test_bionemo_task_names_of_flip_tasks_are_the_builtin_tasks():
    assert resolve_task(load_config(None, ["model.data.task_name=secondary_structure"])).name == "sec_str"
    assert resolve_task(load_config(None, ["model.data.task_name=conservation"])).name == "conservation"
    assert resolve_task(parse_args(["--data-dir", "flip:bind/one_vs_many"])).name == "bind"


def test_several_targets_are_refused_with_what_to_do_instead():
    with pytest.raises(ConfigError, match=r"one target per adapter here.*target_column: '3state'"):
        load_config(None, ["model.data.target_column=[3state,resolved]", "model.data.mask_column=[resolved,null]"])
    assert resolve_task(load_config(None, ["model.data.target_column=[3state]",
                                           "model.data.mask_column=[resolved,null]"])).mask_column == "resolved"


def test_labels_are_inferred_from_the_training_split_and_checked(tmp_path):
    task = task_from_dict({"name": "sol", "kind": "sequence_class", "label_column": "y"}, "t.yaml")
    data = write(tmp_path / "d.csv", "id,sequence,y,set\na,MKT,low,train\nb,MKA,high,train\nv,MKV,low,val\n"
                                     "c,MKC,low,test\n")
    settled, warnings = settle_labels(task, load_splits(task, data))
    assert settled.labels == ("high", "low") and warnings == []
    bad = write(tmp_path / "e.csv", "id,sequence,y,set\na,MKT,low,train\nb,MKA,high,train\nv,MKV,low,val\n"
                                    "z9,MKC,medium,test\n")
    with pytest.raises(DataError, match=r"e.csv: row z9: label\(s\) \['medium'\] of the test split never occur"):
        settle_labels(task, load_splits(task, bad))
    one = write(tmp_path / "f.csv", "id,sequence,y,set\na,MKT,low,train\nb,MKA,low,train\nv,MKV,low,val\n")
    with pytest.raises(DataError, match="training split has 1 class"):
        settle_labels(task, load_splits(task, one))
    per_residue = task_from_dict({"name": "b", "kind": "per_residue", "label_column": "bind",
                                  "mask_column": "m"}, "t.yaml")
    data = write(tmp_path / "g.csv", "id,sequence,bind,m,set\na,MKTA,0110,1111,train\nb,MKA,00x,110,train\n"
                                     "v,MKV,010,111,val\n")
    assert settle_labels(per_residue, load_splits(per_residue, data))[0].labels == ("0", "1")  # x is masked


def test_declared_classes_missing_from_training_are_reported(tmp_path):
    task = TASKS["bind_any"]
    data = write(tmp_path / "d.csv", "id,sequence,target,set\na,MKTA,0110,train\nb,MKA,000,train\n"
                                     "v,MKV,010,val\nc,MKT,000,test\n")
    assert settle_labels(task, load_splits(task, data))[1] == []
    later = write(tmp_path / "e.csv", "id,sequence,target,set\na,MKTA,0000,train\nb,MKA,001,train\nv,MKV,010,val\n"
                                      "c,MKT,704,test\n")
    _, warnings = settle_labels(TASKS["bind"], load_splits(TASKS["bind"], later))
    assert warnings == ["test: classes ['4', '7'] never occur in the training split (4: 1, 7: 1)"]


def test_flip_bind_and_conservation_splits_read_from_the_vendored_zips():
    splits = load_splits(TASKS["bind"], split="one_vs_many")
    assert {k: len(v) for k, v in splits.items()} == {"train": 996, "val": 114, "test": 250}
    binary = load_splits(TASKS["bind_any"])  # from_publication; 1-7 read as 1
    assert {k: len(v) for k, v in binary.items()} == {"train": 954, "val": 106, "test": 300}
    assert set("".join(r.label for r in binary["test"])) == {"0", "1"}
    with pytest.raises(DataError, match="no split 'nope'; splits here: from_publication, one_vs_many"):
        read_file(TASKS["bind"].default_data(), TASKS["bind"], "nope")
    conservation = read_file(TASKS["conservation"].default_data(), TASKS["conservation"])
    assert len(conservation) == 10466 and set(conservation[0].label) <= set("123456789")


def fake_flip_zip(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("splits/mixed.csv", "sequence,target,set,validation\nMKT,neutral,train,\nMKA,effect,train,\n"
                                        "MKV,effect,train,True\nMKC,effect,test,\n")
    return path


def test_flip_downloads_fail_at_once_offline_naming_the_file_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("ESM_ADAPTERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ESM_ADAPTERS_OFFLINE", "1")
    with pytest.raises(flip.FlipError, match=r"FLIP aav: not cached.*download https://github.com/J-SNACKKB/FLIP/raw/"
                                             r"62cace8735f5/splits/aav/splits.zip and put it at .*cache/flip/aav/splits.zip"):
        load_splits(TASKS["aav"])
    monkeypatch.delenv("ESM_ADAPTERS_OFFLINE")
    monkeypatch.setenv("ESM_ADAPTERS_FLIP_URL", "http://127.0.0.1:9/{task}.zip")  # nothing listens on port 9
    with pytest.raises(flip.FlipError, match="FLIP sav: could not download .*refused"):
        load_splits(TASKS["sav"])
    assert not list((tmp_path / "cache").rglob("*.zip*"))  # nothing half-downloaded left behind


def test_a_cached_flip_zip_is_used_only_with_the_pinned_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("ESM_ADAPTERS_CACHE", str(tmp_path / "cache"))
    cached = flip.cache_path("sav")
    cached.parent.mkdir(parents=True)
    fake_flip_zip(cached)
    data = cached.read_bytes()
    monkeypatch.setitem(flip.BLOB_IDS, "sav", hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
    settled, _ = settle_labels(TASKS["sav"], load_splits(TASKS["sav"]))  # flip:sav/mixed, labels from the data
    assert settled.labels == ("effect", "neutral")
    cached.write_bytes(data + b"tampered")
    with pytest.raises(flip.FlipError, match=r"splits.zip: git blob id \w+, expected \w+ .*delete it"):
        load_splits(TASKS["sav"])


def test_metrics_for_rare_and_ordered_classes():
    true = np.array([0] * 90 + [1] * 10)
    lazy = np.zeros(100, dtype=int)  # predicts the majority everywhere: high accuracy, nothing found
    result = metrics.classification(lazy, true, ("0", "1"))
    assert result["accuracy"] == 0.9 and result["mcc"] == 0.0 and result["per_class"]["1"]["recall"] == 0.0
    good = true.copy()
    good[:5] = 1  # 5 false positives
    result = metrics.classification(good, true, ("0", "1"))
    assert result["per_class"]["1"]["f1"] == pytest.approx(2 * (10 / 15) * 1 / (10 / 15 + 1))
    assert result["mcc"] == pytest.approx((10 * 85 - 5 * 0) / np.sqrt(15 * 10 * 85 * 90))
    ordered = metrics.classification(np.array([0, 1, 3, 2]), np.array([1, 1, 1, 2]), ("1", "2", "3", "4"), ordered=True)
    assert ordered["within_one"] == 0.75 and ordered["accuracy"] == 0.5 and "spearman" in ordered
