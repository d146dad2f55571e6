import zipfile

import pytest

from training.data import DataError, crop, load_splits, read_file
from training import flip
from training.tasks import TASKS, get_task

SEC = TASKS["sec_str"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bionemo_csv_keeps_leading_zeros_of_resolved_and_splits(sec_str_csv):
    splits = load_splits(SEC, sec_str_csv)
    assert {k: len(v) for k, v in splits.items()} == {"train": 35, "val": 5, "test": 8}
    assert all(r.mask.startswith("00") for r in splits["train"])


def test_extra_columns_ignored_and_lower_case_upper_cased(tmp_path):
    path = write(tmp_path, "d.csv", "sequence,target,set,validation,notes\nmktay,1.5,train,,hello\n")
    [record] = read_file(path, TASKS["gb1"])
    assert record.sequence == "MKTAY" and record.label == 1.5 and record.split == "train"


def test_fasta_with_flip_headers(tmp_path):
    path = write(tmp_path, "scl.fasta", ">a TARGET=Cell_membrane SET=train VALIDATION=False\nMKTAY\nIAK\n"
                                       ">b TARGET=Lysosome SET=train VALIDATION=True\nMKT\n>c TARGET=Nucleus SET=test\nAAA\n")
    records = read_file(path, TASKS["scl"])
    assert [(r.id, r.sequence, r.label, r.split) for r in records] == [
        ("a", "MKTAYIAK", "Cell membrane", "train"), ("b", "MKT", "Lysosome/Vacuole", "val"),
        ("c", "AAA", "Nucleus", "test")]


def test_flip_secondary_structure_zip(tmp_path):
    path = tmp_path / "splits.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("splits/sequences.fasta", ">x\nMKTAY\n>y\nAAAA\n")
        zf.writestr("splits/sampled.fasta", ">x SET=train VALIDATION=False\nHHEEC\n>y SET=test VALIDATION=False\nCCCC\n")
        zf.writestr("splits/mask.fasta", ">x\n01111\n>y\n1111\n")
    records = read_file(path, SEC)
    assert [(r.id, r.label, r.mask, r.split) for r in records] == [
        ("x", "HHEEC", "01111", "train"), ("y", "CCCC", "1111", "test")]


def test_vendored_defaults_exist_for_every_task_that_declares_one():
    for task in TASKS.values():
        data = task.default_data()
        if data.startswith("flip:"):  # downloaded on first use (tests below)
            assert flip.parse(data)[0] in flip.BLOB_IDS and flip.parse(data)[0] not in flip.VENDORED
            continue
        splits = load_splits(task)
        assert splits["train"] and splits["val"], task.name


def test_eight_state_coil_symbols_and_3state_from_8state(tmp_path):
    path = write(tmp_path, "d.csv", "id,sequence,8state\nq,MKTAY,HG_TS\n")
    assert read_file(path, TASKS["sec_str8"])[0].label == "HGCTS"
    sec = get_task("sec_str")
    path2 = write(tmp_path, "e.csv", "id,sequence,3state\nq,MKTAY,HHEC_\n")
    assert read_file(path2, sec)[0].label == "HHECC"


@pytest.mark.parametrize("text, message", [
    ("id,sequence,3state\nrow7,MKJAY,HHHHH\n", r"row row7: invalid residue 'J' at position 3"),
    ("id,sequence,3state\nrow8,MKTAY,HHH\n", r"row row8: label string has length 3, sequence has 5"),
    ("id,sequence,3state\nrow9,MKTAY,HHQHH\n", r"row row9: labels \['Q'\]"),
    ("id,seq,3state\nrow1,MKTAY,HHHHH\n", r"missing sequence column 'sequence'"),
    ("id,sequence,3state,resolved\nrow2,MKTAY,HHHHH,0110\n", r"row row2: mask '0110' must be a 0/1 string as long"),
    ("id,sequence,3state,resolved\nrow3,MKTAY,HHHHH,01x10\n", r"row row3: mask '01x10'"),
    ("id,sequence\nrow1,MKTAY\n", r"missing label column '3state' for task sec_str"),
    ("id,sequence,3state\n", r"no records"),
    ("", r"empty file"),
])
def test_bad_input_errors_name_the_problem(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_file(write(tmp_path, "bad.csv", text), SEC)


def test_bad_regression_target_and_class(tmp_path):
    with pytest.raises(DataError, match="row 1: target 'abc' is not a number"):
        read_file(write(tmp_path, "g.csv", "sequence,target,set\nMKT,abc,train\n"), TASKS["gb1"])
    with pytest.raises(DataError, match="class 'Moon' is not one of"):
        read_file(write(tmp_path, "s.csv", "sequence,target,set\nMKT,Moon,train\n"), TASKS["scl"])


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="valid tasks: aav, bind, .*sec_str, sec_str8 .*--task-file"):
        get_task("contact")


def test_long_sequences_are_cropped_with_labels_and_masks(tmp_path):
    seq = "A" * 1100
    path = write(tmp_path, "l.csv", f"id,sequence,3state,resolved,set\nlong,{seq},{'H' * 1100},{'1' * 1100},train\n")
    records, n = crop(read_file(path, SEC))
    assert n == 1 and len(records[0].sequence) == len(records[0].label) == len(records[0].mask) == 1022


def test_missing_validation_split_is_carved_from_train(tmp_path):
    lines = "".join(f"MKT{'A' * i},{i}.0,train,\n" for i in range(20))
    splits = load_splits(TASKS["gb1"], write(tmp_path, "g.csv", "sequence,target,set,validation\n" + lines))
    assert len(splits["val"]) == 2 and len(splits["train"]) == 18
