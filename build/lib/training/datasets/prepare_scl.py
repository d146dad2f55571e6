"""How training/datasets/scl/deeploc1_flip.csv was made from Light Attention's DeepLoc 1.0 files.

FLIP's scl `mixed_soft` split = LA train + deeploc_our_val_set (validation) + deeploc_test_set (test).
The LA training FASTA was not obtainable offline, so the vendored default trains on the DeepLoc
validation set (every 10th row held out for validation) and tests on the DeepLoc test set.
Rows labelled `Cytoplasm-Nucleus` (not a FLIP class) and setHARD are left out.
Run: python training/datasets/prepare_scl.py deeploc1_val_test_setHARD.csv training/datasets/scl/deeploc1_flip.csv
"""
import csv
import sys

src, dst = sys.argv[1], sys.argv[2]
with open(src, newline="") as f_in, open(dst, "w", newline="") as f_out:
    out = csv.writer(f_out)
    out.writerow(["id", "sequence", "target", "set", "validation"])
    n_val = 0
    for row in csv.DictReader(f_in):
        if row["target"] == "Cytoplasm-Nucleus" or row["split"] == "setHARD":
            continue
        if row["split"] == "val":
            n_val += 1
            out.writerow([row["id"], row["sequence"], row["target"], "train", "True" if n_val % 10 == 0 else ""])
        else:
            out.writerow([row["id"], row["sequence"], row["target"], "test", ""])
