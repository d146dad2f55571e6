"""How training/datasets/scl/*.csv were made from Light Attention's DeepLoc 1.0 files.

FLIP's scl `mixed_soft` split = LA train + deeploc_our_val_set (validation) + deeploc_test_set (test);
`mixed_hard` tests on setHARD. The LA training FASTA was not obtainable offline, so:
- deeploc1_flip.csv (the task's default data): trains on the DeepLoc validation set (every 10th row
  held out for validation) and tests on the DeepLoc test set;
- deeploc1_sethard.csv (`--data-dir`, bench.quality's scl runs): trains on the DeepLoc validation
  and test sets together (every 10th row held out for validation) and tests on setHARD, the test set
  of the published figures (Schmirler et al. 2024: SCL Q10 on setHARD).
Rows labelled `Cytoplasm-Nucleus` (not a FLIP class) are left out.
Run: python training/datasets/prepare_scl.py deeploc1_val_test_setHARD.csv training/datasets/scl/
"""
import csv
import sys
from pathlib import Path

HEADER = ["id", "sequence", "target", "set", "validation"]


def write(rows: list[dict], path: Path, train_from: set[str], test_from: set[str]) -> None:
    with open(path, "w", newline="") as f_out:
        out = csv.writer(f_out)
        out.writerow(HEADER)
        n_train = 0
        for row in rows:
            if row["split"] in train_from:
                n_train += 1
                out.writerow([row["id"], row["sequence"], row["target"], "train", "True" if n_train % 10 == 0 else ""])
            elif row["split"] in test_from:
                out.writerow([row["id"], row["sequence"], row["target"], "test", ""])


if __name__ == "__main__":
    src, folder = sys.argv[1], Path(sys.argv[2])
    with open(src, newline="") as f_in:
        rows = [row for row in csv.DictReader(f_in) if row["target"] != "Cytoplasm-Nucleus"]
    write(rows, folder / "deeploc1_flip.csv", {"val"}, {"test"})
    write(rows, folder / "deeploc1_sethard.csv", {"val", "test"}, {"setHARD"})
