"""FLIP tasks. Adding a task is one `Task(...)` declaration in TASKS."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modeling.heads import PER_RESIDUE, REGRESSION, SEQUENCE_CLASS

DATASETS = Path(__file__).resolve().parent.parent / "datasets"
COIL = {"_": "C", "~": "C", "-": "C", " ": "C"}
EIGHT_TO_THREE = {"H": "H", "G": "H", "I": "H", "E": "E", "B": "E", "T": "C", "S": "C", "C": "C"}
SCL_CLASSES = ("Cell membrane", "Cytoplasm", "Endoplasmic reticulum", "Extracellular",
               "Golgi apparatus", "Lysosome/Vacuole", "Mitochondrion", "Nucleus", "Peroxisome",
               "Plastid")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # PER_RESIDUE, SEQUENCE_CLASS or REGRESSION: decides head, loss and metrics
    labels: tuple[str, ...]  # classes (per-residue states or sequence classes); () for regression
    label_columns: tuple[str, ...]  # where labels come from in a CSV, first found wins
    metric: str  # what early stopping and checkpointing watch (q3, q8, accuracy, spearman)
    default_data: Path | None  # vendored default; None = the user must give --data-dir/--train
    label_aliases: dict[str, str] = field(default_factory=dict)  # raw label -> canonical
    coarse: dict[str, dict[str, str]] = field(default_factory=dict)  # extra metric -> label map
    description: str = ""

    @property
    def metric_mode(self) -> str:
        return "min" if self.metric in ("mse", "loss") else "max"


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("sec_str", PER_RESIDUE, ("H", "E", "C"), ("3state",), "q3",
         DATASETS / "sec_str" / "flip_secondary_structure_splits.zip",
         label_aliases={"G": "H", "I": "H", "B": "E", "T": "C", "S": "C", **COIL},
         description="3-state secondary structure per residue (FLIP sampled split, NEW364 test)"),
    Task("sec_str8", PER_RESIDUE, ("H", "G", "I", "E", "B", "T", "S", "C"), ("8state",), "q8",
         DATASETS / "sec_str8", label_aliases=dict(COIL), coarse={"q3": EIGHT_TO_THREE},
         description="8-state secondary structure per residue (BioNeMo v1 FLIP sample)"),
    Task("scl", SEQUENCE_CLASS, SCL_CLASSES, ("target",), "accuracy",
         DATASETS / "scl" / "deeploc1_flip.csv",
         label_aliases={"Lysosome": "Lysosome/Vacuole", "Vacuole": "Lysosome/Vacuole"},
         description="10-class subcellular localisation (DeepLoc 1.0)"),
    Task("meltome", REGRESSION, (), ("target",), "spearman",
         DATASETS / "meltome" / "meltome_cv_test.fasta",
         description="melting temperature regression (biotrainer toy subset)"),
    Task("gb1", REGRESSION, (), ("target",), "spearman", DATASETS / "gb1" / "two_vs_rest.csv",
         description="GB1 fitness regression (FLIP two_vs_rest)"),
    Task("aav", REGRESSION, (), ("target",), "spearman", None,
         description="AAV capsid fitness regression (FLIP splits; bring your own with --data-dir)"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
