"""Read FLIP / BioNeMo data files into validated records, split into train/val/test.

Formats:
  CSV   `id,sequence,3state,8state,resolved` (BioNeMo) or `sequence,target,set,validation` (FLIP);
        extra columns are ignored.
  FASTA `>id TARGET=... SET=train|val|test VALIDATION=True|False`, body = the sequence.
  FLIP secondary-structure split: a zip or folder with sampled.fasta (labels, SET/VALIDATION),
        sequences.fasta and mask.fasta (1 = resolved residue, the only ones scored).
"""
from __future__ import annotations

import csv
import io
import logging
import random
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from modeling.alphabet import MAX_RESIDUES, SequenceError, normalise
from modeling.heads import PER_RESIDUE, REGRESSION
from training.tasks import Task

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
FLIP_SS_FILES = ("sampled.fasta", "sequences.fasta", "mask.fasta")


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Record:
    id: str
    sequence: str
    label: str | float  # per-residue label string, class name, or regression target
    mask: str | None = None  # per-residue "0/1" string; None = every residue is scored
    split: str | None = None


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
        if bad := sorted(set(label) - set(task.labels)):
            raise DataError(f"{where}: labels {bad} are not in {''.join(task.labels)}")
        if mask is not None:
            mask = mask.strip()
            if len(mask) != len(seq) or set(mask) - {"0", "1"}:
                raise DataError(f"{where}: resolved mask must be a 0/1 string as long as the sequence")
        value: str | float = label
    elif task.kind == REGRESSION:
        try:
            value = float(label)
        except ValueError:
            raise DataError(f"{where}: target {label!r} is not a number") from None
    else:
        name = label.strip().replace("_", " ")
        name = task.label_aliases.get(name, name)
        if name not in task.labels:
            raise DataError(f"{where}: class {label!r} is not one of {list(task.labels)}")
        value = name
    return Record(rid, seq, value, mask, split)


def parse_header(header: str) -> tuple[str, dict[str, str]]:
    rid, _, rest = header.partition(" ")
    return rid, dict(re.findall(r"(\w+)=(\S+)", rest))


def fasta_entries(text: str) -> list[tuple[str, str]]:
    entries, header, body = [], None, []
    for line in text.splitlines():
        if line.startswith(">"):
            if header is not None:
                entries.append((header, "".join(body)))
            header, body = line[1:].strip(), []
        elif line.strip():
            body.append(line.strip())
    if header is not None:
        entries.append((header, "".join(body)))
    return entries


def read_csv(path: Path, task: Task) -> list[Record]:
    text = path.read_text()
    if not text.strip():
        raise DataError(f"{path}: empty file")
    reader = csv.DictReader(io.StringIO(text))  # csv keeps mask strings such as 0011 intact
    columns = reader.fieldnames or []
    if "sequence" not in columns:
        raise DataError(f"{path}: missing column 'sequence' (found {columns})")
    label_col = next((c for c in task.label_columns if c in columns), None)
    if label_col is None:
        raise DataError(f"{path}: missing label column {' or '.join(task.label_columns)} "
                        f"for task {task.name} (found {columns})")
    records = []
    for n, row in enumerate(reader, start=1):
        rid = row.get("id") or f"{n}"
        mask = row.get("resolved") if task.kind == PER_RESIDUE else None
        records.append(_check(task, str(path), rid, row["sequence"] or "", row[label_col] or "",
                              mask or None, _split_of(row.get("set"), row.get("validation"))))
    return records


def read_fasta(path: Path, task: Task) -> list[Record]:
    records = []
    text = path.read_text()
    if not text.strip():
        raise DataError(f"{path}: empty file")
    for header, body in fasta_entries(text):
        rid, fields = parse_header(header)
        if "TARGET" not in fields:
            raise DataError(f"{path}: record {rid} has no TARGET= in its header")
        records.append(_check(task, str(path), rid, body, fields["TARGET"], None,
                              _split_of(fields.get("SET"), fields.get("VALIDATION"))))
    return records


def _flip_ss_texts(source: Path) -> dict[str, str]:
    if source.is_dir():
        return {name: (source / name).read_text() for name in FLIP_SS_FILES}
    with zipfile.ZipFile(source) as zf:
        by_base = {Path(n).name: n for n in zf.namelist()}
        missing = [n for n in FLIP_SS_FILES if n not in by_base]
        if missing:
            raise DataError(f"{source}: zip lacks {missing}")
        return {name: zf.read(by_base[name]).decode() for name in FLIP_SS_FILES}


def read_flip_secondary_structure(source: Path, task: Task) -> list[Record]:
    texts = _flip_ss_texts(source)
    seqs = {parse_header(h)[0]: b for h, b in fasta_entries(texts["sequences.fasta"])}
    masks = {parse_header(h)[0]: b for h, b in fasta_entries(texts["mask.fasta"])}
    records = []
    for header, labels in fasta_entries(texts["sampled.fasta"]):
        rid, fields = parse_header(header)
        if rid not in seqs:
            raise DataError(f"{source}: row {rid} has labels but no sequence in sequences.fasta")
        records.append(_check(task, str(source), rid, seqs[rid], labels, masks.get(rid),
                              _split_of(fields.get("SET"), fields.get("VALIDATION"))))
    return records


def read_file(path: Path, task: Task) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix == ".zip" or (path.is_dir() and (path / "sampled.fasta").exists()):
        records = read_flip_secondary_structure(path, task)
    elif path.suffix.lower() == ".csv":
        records = read_csv(path, task)
    elif path.suffix.lower() in (".fasta", ".fa", ".faa"):
        records = read_fasta(path, task)
    else:
        raise DataError(f"{path}: unknown format; expected .csv, .fasta or a FLIP split .zip")
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


def load_splits(task: Task, data: Path | None = None, train: Path | None = None,
                val: Path | None = None, test: Path | None = None, seed: int = 0,
                val_fraction: float = 0.1) -> dict[str, list[Record]]:
    """Records by split. `data` is a file with split columns/headers or a folder of split files;
    explicit --train/--val/--test files take precedence."""
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    explicit = {"train": train, "val": val, "test": test}
    if not any(explicit.values()):
        data = data or task.default_data
        if data is None:
            raise DataError(f"task {task.name} has no vendored data; pass --data-dir or --train")
        data = Path(data)
        files = _split_files(data) if data.is_dir() and not (data / "sampled.fasta").exists() else {}
        if files:
            explicit = files
        else:
            for r in read_file(data, task):
                if r.split is None:
                    raise DataError(f"{data}: row {r.id} has no set/split; pass --train/--val/--test files")
                splits[r.split].append(r)
    for split, path in explicit.items():
        if path:
            splits[split].extend(replace(r, split=split) for r in read_file(Path(path), task))
    if not splits["train"]:
        raise DataError(f"no training records for task {task.name}")
    if not splits["val"]:
        shuffled = list(splits["train"])
        random.Random(seed).shuffle(shuffled)
        n_val = max(1, int(len(shuffled) * val_fraction))
        splits["val"], splits["train"] = shuffled[:n_val], shuffled[n_val:]
    for split in SPLITS:
        splits[split], n = crop(splits[split])
        if n:
            log.warning("%s: cropped %d sequences longer than %d residues", split, n, MAX_RESIDUES)
    return splits
