"""Tasks are data. A task is a declaration (the built-in ones are `training/tasks/*.yaml`); a user
declares their own the same way: a yaml file (`--task-file`), flags (`--task NAME --kind ...`), or
BioNeMo's `model.data.*` keys in the training yaml (training/config.py turns those into this form).

A declaration says: name, kind, where sequence / label / mask come from in a CSV, the label set
(or nothing: then the sorted distinct labels of the training split), the metric to watch, default
data and FLIP split, label aliases, extra coarse metrics, whether classes are ordered, and the
task's training recipe: config keys and values (`trainer.max_epochs: 8`) that flags and overrides
win over and a `--config` yaml replaces (training/config.py applies them).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modeling.registry import NAME_RE
from modeling.kinds import PER_RESIDUE, REGRESSION, SEQUENCE_CLASS

DATASETS = Path(__file__).resolve().parent / "datasets"  # installed with the package (package data)
BUILTIN = Path(__file__).resolve().parent / "tasks"
# BioNeMo's task_type names and ours
KINDS = {PER_RESIDUE: PER_RESIDUE, "token-level-classification": PER_RESIDUE,
         SEQUENCE_CLASS: SEQUENCE_CLASS, "classification": SEQUENCE_CLASS, REGRESSION: REGRESSION}
CLASS_METRICS = ("accuracy", "macro_f1", "mcc", "within_one", "spearman")  # q3, q8, ...: accuracy too
REGRESSION_METRICS = ("spearman", "pearson", "mse")
DEFAULT_METRIC = {PER_RESIDUE: "accuracy", SEQUENCE_CLASS: "accuracy", REGRESSION: "spearman"}


class TaskError(ValueError):
    pass


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # PER_RESIDUE, SEQUENCE_CLASS or REGRESSION: decides head, loss and metrics
    labels: tuple[str, ...] = ()  # classes; () = regression, or inferred from the training split
    sequence_column: str = "sequence"
    label_column: str = "target"  # CSV column (FASTA: the TARGET= header field)
    mask_column: str | None = None  # per-residue 0/1 string: only residues marked 1 are scored
    metric: str = ""  # what early stopping and checkpointing watch; "" = the kind's default
    data: str | None = None  # default data: a path (relative to training/datasets/ for built-ins) or flip:TASK/SPLIT
    split: str | None = None  # the FLIP split to read from a FLIP zip/folder or flip:TASK
    flip_name: str | None = None  # this task's name in FLIP (and in BioNeMo's task_name)
    label_aliases: dict[str, str] = field(default_factory=dict)  # raw label -> label
    coarse: dict[str, dict[str, str]] = field(default_factory=dict)  # extra metric -> label map
    ordered: bool = False  # classes are ordered: within-one accuracy and Spearman are reported too
    recipe: dict[str, object] = field(default_factory=dict)  # config key -> value: this task's defaults
    description: str = ""
    source: str = ""  # where it was declared, for messages

    def __post_init__(self):
        where = f"task {self.name!r} ({self.source or 'declared'})"
        if not isinstance(self.name, str) or not NAME_RE.match(self.name) or ".." in self.name:
            raise TaskError(f"{where}: name must be 1-64 letters, digits, '-', '_' or '.'")
        if self.kind not in KINDS:
            raise TaskError(f"{where}: kind {self.kind!r} is not one of {sorted(KINDS)}")
        object.__setattr__(self, "kind", KINDS[self.kind])
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if self.kind == REGRESSION and self.labels:
            raise TaskError(f"{where}: a regression task has no labels")
        if len(set(self.labels)) != len(self.labels):
            raise TaskError(f"{where}: labels {list(self.labels)} repeat a label")
        if self.labels and len(self.labels) < 2:
            raise TaskError(f"{where}: needs at least two labels, got {list(self.labels)}")
        if self.kind == PER_RESIDUE and any(len(label) != 1 for label in self.labels):
            raise TaskError(f"{where}: per-residue labels are one character each (a label string has "
                            f"one per residue), got {list(self.labels)}")
        if self.mask_column and self.kind != PER_RESIDUE:
            raise TaskError(f"{where}: mask_column only applies to per-residue tasks")
        metric = self.metric or DEFAULT_METRIC[self.kind]
        allowed = REGRESSION_METRICS if self.kind == REGRESSION else CLASS_METRICS
        if metric not in allowed and not (self.kind != REGRESSION and re.fullmatch(r"q\d+", metric)):
            raise TaskError(f"{where}: metric {metric!r} for a {self.kind} task: one of {list(allowed)}"
                            + ("" if self.kind == REGRESSION else " or q<N> (accuracy under that name)"))
        if metric in ("within_one", "spearman") and self.kind != REGRESSION and not self.ordered:
            raise TaskError(f"{where}: metric {metric} needs ordered: true")
        object.__setattr__(self, "metric", metric)
        aliases = {str(k): str(v) for k, v in (self.label_aliases or {}).items()}
        object.__setattr__(self, "label_aliases", aliases)
        if self.labels and (bad := sorted(set(aliases.values()) - set(self.labels))):
            raise TaskError(f"{where}: label_aliases map to {bad}, which are not labels {list(self.labels)}")
        if not isinstance(self.recipe, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float, bool, list))
                                                        for k, v in self.recipe.items()):
            raise TaskError(f"{where}: recipe is a mapping of config keys to values, e.g. "
                            f"{{trainer.max_epochs: 8}}; got {self.recipe!r}")
        for name, mapping in self.coarse.items():
            if missing := sorted(set(self.labels) - set(mapping)):
                raise TaskError(f"{where}: coarse metric {name} does not map labels {missing}")

    @property
    def metric_mode(self) -> str:
        return "min" if self.metric in ("mse", "loss") else "max"

    def as_dict(self) -> dict:
        """The declaration as a user would write it (recorded in every manifest)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        out["labels"] = list(self.labels)
        return {k: v for k, v in out.items() if v not in (None, "", {}, False) or k in ("name", "kind", "labels")}

    def default_data(self) -> str | None:
        """The default data as a path (built-ins: under training/datasets/) or a flip: reference."""
        if self.data is None or self.data.startswith("flip:"):
            return self.data
        path = Path(self.data)
        base = DATASETS if self.source.startswith(str(BUILTIN)) else Path(self.source).parent
        return str(path if path.is_absolute() else base / path)


FIELDS = {f.name for f in dataclasses.fields(Task)} - {"source"}


def task_from_dict(data: dict, source: str) -> Task:
    if not isinstance(data, dict):
        raise TaskError(f"{source}: a task declaration is a mapping of {sorted(FIELDS)}")
    for key in data:
        if key not in FIELDS:
            near = difflib.get_close_matches(str(key), FIELDS, n=1)
            raise TaskError(f"{source}: unknown task key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                            + f" (keys: {sorted(FIELDS)})")
    for key in ("name", "kind"):
        if key not in data:
            raise TaskError(f"{source}: a task needs {key!r}")
    values = dict(data)
    if isinstance(values.get("labels"), str):
        values["labels"] = [v.strip() for v in values["labels"].split(",") if v.strip()]
    values["labels"] = tuple(values.get("labels") or ())
    try:
        return Task(**values, source=source)
    except TypeError as exc:
        raise TaskError(f"{source}: {exc}") from exc


def load_task_file(path: str | Path) -> Task:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TaskError(f"task file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise TaskError(f"task file {path}: not valid YAML ({exc})") from exc
    return task_from_dict(data, str(path.resolve()))


def _builtin() -> dict[str, Task]:
    tasks = {}
    for path in sorted(BUILTIN.glob("*.yaml")):
        task = load_task_file(path)
        if task.name != path.stem:
            raise TaskError(f"{path}: declares task {task.name!r}; the file must be named {task.name}.yaml")
        tasks[task.name] = task
    return tasks


TASKS: dict[str, Task] = _builtin()
FLIP_NAMES = {t.flip_name: t.name for t in TASKS.values() if t.flip_name}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} (or declare your own: "
                        f"--task-file, or --task NAME --kind ...)")
    return TASKS[name]


def with_overrides(task: Task, **changes) -> Task:
    """The task with some fields changed (flags, BioNeMo keys), validated again."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if "kind" in changes and "metric" not in changes and KINDS.get(changes["kind"]) != task.kind:
        changes["metric"] = ""  # the new kind's default, not the old kind's metric
    if "labels" in changes and isinstance(changes["labels"], str):
        changes["labels"] = [v.strip() for v in changes["labels"].split(",") if v.strip()]
    if "labels" in changes:
        changes["labels"] = tuple(changes["labels"])
    return dataclasses.replace(task, **changes) if changes else task
