"""The training config's task and data: built-in, a task file, flags, or BioNeMo's keys.

BioNeMo's `model.data` keys mean what they mean in BioNeMo:
  task_name      one of FLIP's eight names -> that built-in task; any other name declares a new task
  task_type      token-level-classification / classification / regression (the task's kind)
  sequence_column, target_column, mask_column   CSV columns (mask: 0/1 per residue; null = all scored)
  target_sizes, num_classes   the number of classes: checked against the label set
  dataset_path + dataset.{train,val,test}   files <dataset_path>/<split>/<stem>.csv, stems such as
                 x000 or x[000..003]
One target per adapter: several target columns are refused with what to do instead.
"""
from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

from training.config import ConfigError, FitConfig
from training.data import SPLITS
from training.tasks import FLIP_NAMES, TASKS, Task, TaskError, load_task_file, task_from_dict, with_overrides

DEFAULT_TASK = "sec_str"


def _single(key: str, value, what: str):
    """BioNeMo allows lists (one entry per target); here one target per adapter."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1 and not (what == "mask" and len(value) > 1 and all(v is None for v in value[1:])):
            raise ConfigError(
                f"{key}={list(value)}: one target per adapter here (one head, scored and served); train one "
                f"adapter per target instead, e.g. target_column: {value[0]!r} with its own mask_column")
        return value[0]
    return value


def resolve_task(config: FitConfig) -> Task:
    d, flags = config.model.data, asdict(config.task_def)
    name = config.task
    flip_name = d.task_name
    if not flip_name and str(d.dataset_path or "").startswith("flip:"):
        flip_name = str(d.dataset_path).removeprefix("flip:").partition("/")[0]  # --data-dir flip:bind/...
    if flip_name and not name and not config.task_file:
        name = FLIP_NAMES.get(flip_name, flip_name)  # a FLIP name is that built-in task
    if config.task_file:
        try:
            task = load_task_file(config.task_file)
        except TaskError as exc:
            raise ConfigError(str(exc)) from exc
        if name and name != task.name:
            raise ConfigError(f"task {name!r} given, but {config.task_file} declares task {task.name!r}")
    elif (name or DEFAULT_TASK) in TASKS:
        task = TASKS[name or DEFAULT_TASK]
    else:
        kind = flags["kind"] or d.task_type
        if not kind:
            raise ConfigError(f"unknown task {name!r}: declare it with --kind (per_residue, sequence_class, "
                              f"regression) or model.data.task_type, or --task-file; built-in tasks: "
                              f"{', '.join(TASKS)}")
        try:
            task = task_from_dict({"name": name, "kind": kind}, "flags")
        except TaskError as exc:
            raise ConfigError(str(exc)) from exc
    changes = {**{k: v for k, v in flags.items() if v is not None},
               **{k: v for k, v in (("kind", d.task_type), ("sequence_column", d.sequence_column),
                                    ("label_column", _single("model.data.target_column", d.target_column, "target")),
                                    ("mask_column", _single("model.data.mask_column", d.mask_column, "mask")))
                  if v is not None}}
    try:
        return with_overrides(task, **changes)
    except (TaskError, TypeError) as exc:
        raise ConfigError(f"task {task.name}: {exc}") from exc


def expected_classes(config: FitConfig) -> int | None:
    """BioNeMo's num_classes / target_sizes, checked against the label set once it is known."""
    d = config.model.data
    sizes = _single("model.data.target_sizes", d.target_sizes, "target")
    values = {v for v in (d.num_classes, sizes) if v is not None}
    if len(values) > 1:
        raise ConfigError(f"model.data.num_classes={d.num_classes} and target_sizes={d.target_sizes} disagree")
    return values.pop() if values else None


def expand_stems(stem: str) -> list[str]:
    """BioNeMo's file stems: 'x000', or 'x[000..003]' for x000 x001 x002 x003."""
    match = re.fullmatch(r"(.*)\[(\d+)\.\.(\d+)\](.*)", stem)
    if not match:
        return [stem]
    prefix, low, high, suffix = match.groups()
    return [f"{prefix}{i:0{len(low)}d}{suffix}" for i in range(int(low), int(high) + 1)]


def data_files(config: FitConfig) -> dict:
    """dataset_path / train / val / test as load_splits takes them, BioNeMo's layout resolved."""
    d = config.model.data
    out = {"data": d.dataset_path, "train": d.train, "val": d.val, "test": d.test}
    stems = {split: getattr(d.dataset, split) for split in SPLITS if getattr(d.dataset, split)}
    if not stems:
        return out
    if not d.dataset_path:
        raise ConfigError("model.data.dataset.{train,val,test} name files under model.data.dataset_path: set it")
    root = Path(d.dataset_path)
    for split, stem in stems.items():
        if out[split]:
            raise ConfigError(f"model.data.{split} and model.data.dataset.{split} both given: choose one")
        files = []
        for s in expand_stems(str(stem)):
            matches = [root / split / f"{s}{ext}" for ext in (".csv", ".fasta") if (root / split / f"{s}{ext}").exists()]
            if not matches:
                raise ConfigError(f"model.data.dataset.{split}={stem}: no {root / split / s}.csv (BioNeMo's layout: "
                                  f"<dataset_path>/<split>/<stem>.csv)")
            files.append(matches[0])
        out[split] = files
    out["data"] = None
    return out

