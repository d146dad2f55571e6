"""Read a task's data files into validated records, split into train/val/test.

Where each field comes from is the task's declaration (training/tasks.py):
  CSV   a sequence column, a label column, optionally a per-residue 0/1 mask column, an `id` column
        if present and FLIP's `set`/`validation` columns; other columns are ignored.
  FASTA `>id TARGET=... SET=train|val|test VALIDATION=True|False`, body = the sequence.
  FLIP split zip or folder: `sequences.fasta` plus one label file per split (`sampled.fasta`,
        `one_vs_many.fasta`, ... with SET/VALIDATION headers and one label per residue; or a
        `<split>.csv`), optionally `mask.fasta`; the task's split (or --split) picks the label file.
Every error names the file, the row and the value.
"""
from __future__ import annotations

import csv
import io
import logging
import random
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from modeling.alphabet import MAX_RESIDUES, SequenceError, normalise
from esm_adapters.fasta import fasta_entries, parse_header
from modeling.kinds import PER_RESIDUE, REGRESSION
from training import flip
from training.tasks import Task, with_overrides

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Record:
    id: str
    sequence: str
    label: str | float  # per-residue label string, class name, or regression target
    mask: str | None = None  # per-residue "0/1" string; None = every residue is scored
    split: str | None = None
    source: str = ""  # the file it came from (for messages)


def _split_of(set_value: str | None, validation: str | None) -> str | None:
    value = (set_value or "").strip().lower()
    if value in ("val", "valid", "validation"):
        return "val"
    if value == "train":
        return "val" if (validation or "").strip().lower() in ("true", "1", "yes") else "train"
    if value == "test":
        return "test"
    return None


def _check(task: Task, source: str, rid: str, sequence: str, label: str, mask: str | None,
           split: str | None) -> Record:
    where = f"{source}: row {rid}"
    try:
        seq = normalise(sequence, where)
    except SequenceError as exc:
        raise DataError(str(exc)) from exc
    if task.kind == PER_RESIDUE:
        label = "".join(task.label_aliases.get(c, c) for c in label.strip())
        if len(label) != len(seq):
            raise DataError(f"{where}: label string has length {len(label)}, sequence has {len(seq)}")
        if task.labels and (bad := sorted(set(label) - set(task.labels))):
            raise DataError(f"{where}: labels {bad} are not in {''.join(task.labels)}")
        if mask is not None:
            mask = mask.strip()
            if len(mask) != len(seq) or set(mask) - {"0", "1"}:
                raise DataError(f"{where}: mask {mask[:40]!r} must be a 0/1 string as long as the sequence "
                                f"({len(seq)}), got length {len(mask)}")
        value: str | float = label
    elif task.kind == REGRESSION:
        try:
            value = float(label)
        except ValueError:
            raise DataError(f"{where}: target {label!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise DataError(f"{where}: target {label!r} is not a finite number")
    else:
        name = label.strip().replace("_", " ")
        name = task.label_aliases.get(name, name)
        if not name:
            raise DataError(f"{where}: empty class label")
        if task.labels and name not in task.labels:
            raise DataError(f"{where}: class {label!r} is not one of {list(task.labels)}")
        value = name
    return Record(rid, seq, value, mask, split, source)


def read_csv_text(text: str, source: str, task: Task) -> list[Record]:
    if not text.strip():
        raise DataError(f"{source}: empty file")
    reader = csv.DictReader(io.StringIO(text))  # csv keeps mask strings such as 0011 intact
    columns = reader.fieldnames or []
    for role, column in (("sequence", task.sequence_column), ("label", task.label_column)):
        if column not in columns:
            raise DataError(f"{source}: missing {role} column {column!r} for task {task.name} (found {columns})")
    mask_column = task.mask_column if task.mask_column in columns else None
    if task.mask_column and mask_column is None:
        log.warning("%s: no mask column %r: every residue is scored", source, task.mask_column)
    records = []
    for n, row in enumerate(reader, start=1):
        rid = row.get("id") or f"{n}"
        records.append(_check(task, source, rid, row[task.sequence_column] or "", row[task.label_column] or "",
                              (row[mask_column] or None) if mask_column else None,
                              _split_of(row.get("set"), row.get("validation"))))
    return records


def read_fasta_text(text: str, source: str, task: Task) -> list[Record]:
    if not text.strip():
        raise DataError(f"{source}: empty file")
    records = []
    for header, body in fasta_entries(text):
        rid, fields = parse_header(header)
        if "TARGET" not in fields:
            raise DataError(f"{source}: row {rid} has no TARGET= in its header")
        records.append(_check(task, source, rid, body, fields["TARGET"], None,
                              _split_of(fields.get("SET"), fields.get("VALIDATION"))))
    return records


def _flip_files(source: Path) -> dict[str, str]:
    """File name -> text of a FLIP split zip or folder (any depth: FLIP's zips hold splits/...)."""
    if source.is_dir():
        return {p.name: p.read_text() for p in source.iterdir() if p.suffix in (".fasta", ".csv")}
    try:
        with zipfile.ZipFile(source) as zf:
            return {Path(n).name: zf.read(n).decode() for n in zf.namelist()
                    if Path(n).suffix in (".fasta", ".csv") and not Path(n).name.startswith(".")}
    except zipfile.BadZipFile as exc:
        raise DataError(f"{source}: not a zip file ({exc})") from exc


def read_flip_split(source: Path, task: Task, split: str | None = None) -> list[Record]:
    """One split of a FLIP zip/folder: labels from `<split>.fasta` (one per residue) or `<split>.csv`."""
    files = _flip_files(source)
    split = split or task.split or "sampled"
    available = sorted(Path(n).stem for n in files if n not in ("sequences.fasta", "mask.fasta"))
    if f"{split}.csv" in files:
        return read_csv_text(files[f"{split}.csv"], f"{source}:{split}.csv", task)
    if f"{split}.fasta" not in files:
        raise DataError(f"{source}: no split {split!r}; splits here: {', '.join(available)} (choose with --split)")
    if task.kind != PER_RESIDUE:
        return read_fasta_text(files[f"{split}.fasta"], f"{source}:{split}.fasta", task)
    if "sequences.fasta" not in files:
        raise DataError(f"{source}: lacks sequences.fasta")
    seqs = {parse_header(h)[0]: b for h, b in fasta_entries(files["sequences.fasta"])}
    masks = {parse_header(h)[0]: b for h, b in fasta_entries(files.get("mask.fasta", ""))}
    where = f"{source}:{split}.fasta"
    records = []
    for header, labels in fasta_entries(files[f"{split}.fasta"]):
        rid, fields = parse_header(header)
        if rid not in seqs:
            raise DataError(f"{where}: row {rid} has labels but no sequence in sequences.fasta")
        records.append(_check(task, where, rid, seqs[rid], labels, masks.get(rid),
                              _split_of(fields.get("SET"), fields.get("VALIDATION"))))
    return records


def is_flip_split(path: Path) -> bool:
    """A FLIP split zip, or a folder of one: sequences.fasta with label files, or the split CSVs
    (`three_vs_rest.csv`, ...; a folder of train/val/test files is the other layout)."""
    if path.suffix == ".zip":
        return True
    if not path.is_dir():
        return False
    return (path / "sequences.fasta").exists() or (any(path.glob("*.csv")) and not _split_files(path))


def read_file(path: Path | str, task: Task, split: str | None = None) -> list[Record]:
    """Records of one data file: CSV, FASTA, a FLIP split zip/folder, or flip:TASK[/SPLIT]."""
    if str(path).startswith("flip:"):
        name, flip_split = flip.parse(str(path))
        path, split = flip.locate(name), flip_split or split
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if is_flip_split(path):
        records = read_flip_split(path, task, split)
    elif path.suffix.lower() == ".csv":
        records = read_csv_text(path.read_text(), str(path), task)
    elif path.suffix.lower() in (".fasta", ".fa", ".faa"):
        records = read_fasta_text(path.read_text(), str(path), task)
    else:
        raise DataError(f"{path}: unknown format; expected .csv, .fasta, a FLIP split .zip or flip:TASK/SPLIT")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _split_files(folder: Path) -> dict[str, Path]:
    found = {}
    for split in SPLITS:
        matches = sorted(p for p in folder.iterdir() if p.name.lower().startswith(split)
                         and p.suffix.lower() in (".csv", ".fasta", ".fa"))
        if matches:
            found[split] = matches[0]
    return found


def crop(records: list[Record], limit: int = MAX_RESIDUES) -> tuple[list[Record], int]:
    """Crop sequences (and labels, masks) longer than the model's positions; returns the count."""
    out, cropped = [], 0
    for r in records:
        if len(r.sequence) > limit:
            cropped += 1
            label = r.label[:limit] if isinstance(r.label, str) and len(r.label) == len(r.sequence) else r.label
            r = replace(r, sequence=r.sequence[:limit], label=label, mask=r.mask[:limit] if r.mask else None)
        out.append(r)
    return out, cropped


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def load_splits(task: Task, data: Path | str | None = None, train=None, val=None, test=None, seed: int = 0,
                val_fraction: float = 0.1, split: str | None = None) -> dict[str, list[Record]]:
    """Records by split. `data` is a file with split columns/headers, a FLIP split zip/folder,
    flip:TASK[/SPLIT], or a folder of split files; explicit train/val/test files (one or a list
    each) take precedence. A missing validation split is carved from train."""
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    explicit = {"train": _as_list(train), "val": _as_list(val), "test": _as_list(test)}
    if not any(explicit.values()):
        data = data or task.default_data()
        if data is None:
            raise DataError(f"task {task.name} has no default data; pass --data-dir or --train")
        if not str(data).startswith("flip:") and Path(data).is_dir() and not is_flip_split(Path(data)):
            explicit = {k: [v] for k, v in _split_files(Path(data)).items()}
        else:
            for r in read_file(data, task, split):
                if r.split is None:
                    raise DataError(f"{r.source}: row {r.id} has no set/split; pass --train/--val/--test files")
                splits[r.split].append(r)
    for name, paths in explicit.items():
        for path in paths:
            splits[name].extend(replace(r, split=name) for r in read_file(path, task, split))
    if not splits["train"]:
        raise DataError(f"no training records for task {task.name}")
    if not splits["val"]:
        shuffled = list(splits["train"])
        random.Random(seed).shuffle(shuffled)
        n_val = max(1, int(len(shuffled) * val_fraction))
        splits["val"], splits["train"] = shuffled[:n_val], shuffled[n_val:]
    for name in SPLITS:
        splits[name], n = crop(splits[name])
        if n:
            log.warning("%s: cropped %d sequences longer than %d residues", name, n, MAX_RESIDUES)
    return splits


def scored(record: Record) -> str:
    """The per-residue labels that count: those the mask keeps."""
    return record.label if record.mask is None else "".join(c for c, m in zip(record.label, record.mask) if m == "1")


def label_counts(task: Task, records: list[Record]) -> Counter:
    if task.kind == PER_RESIDUE:
        return Counter(c for r in records for c in scored(r))
    return Counter(r.label for r in records)


def settle_labels(task: Task, splits: dict[str, list[Record]]) -> tuple[Task, list[str]]:
    """The task with its label set (inferred from the training split when it declares none: the
    sorted distinct labels), every record checked against it; returns (task, warnings)."""
    if task.kind == REGRESSION:
        return task, []
    seen = label_counts(task, splits["train"])
    if not task.labels:
        if len(seen) < 2:
            raise DataError(f"task {task.name}: the training split has {len(seen)} class(es) {sorted(seen)}; "
                            f"a classifier needs at least two")
        task = with_overrides(task, labels=sorted(seen))
        for name in ("val", "test"):  # the declared set was checked at read time; an inferred one now
            for r in splits[name]:
                unknown = sorted(set(scored(r)) - set(task.labels)) if task.kind == PER_RESIDUE else \
                    ([r.label] if r.label not in task.labels else [])
                if unknown:
                    raise DataError(f"{r.source}: row {r.id}: label(s) {unknown} of the {name} split never occur "
                                    f"in the training split (labels {list(task.labels)})")
    elif len(seen) < 2:
        raise DataError(f"task {task.name}: the training split has {len(seen)} class(es) {sorted(seen)}; "
                        f"a classifier needs at least two")
    warnings = []
    for name in ("val", "test"):  # declared classes the model never sees in training: say so
        later = label_counts(task, splits[name])
        if missing := sorted(set(later) - set(seen)):
            warnings.append(f"{name}: classes {missing} never occur in the training split "
                            f"({', '.join(f'{c}: {later[c]}' for c in missing)})")
    for warning in warnings:
        log.warning("task %s: %s", task.name, warning)
    return task, warnings
