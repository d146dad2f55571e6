"""Train a task adapter and publish it:  python -m training.fit --task sec_str --rank 16

Flags are shortcuts for config keys; `key=value` arguments override any key (Hydra's grammar,
BioNeMo's names too), e.g.  python -m training.fit --config my.yaml model.peft.lora_tuning.adapter_dim=8
BioNeMo's own files and command line run as they are (training/config.py, training/bionemo.py):
  python -m training.fit --config-path=DIR --config-name=downstream_sec_str_LORA \
      model.data.dataset_path=DATA model.restore_encoder_path=esm2_t33_650M_UR50D
Your own task: --task-file my_task.yaml, or --task NAME --kind per_residue --label-column bind ...
(--list-tasks shows every known task).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from modeling.bundle import BundleError
from modeling.kinds import REGRESSION
from training.config import MODE_OVERRIDES, ConfigError, FitConfig, load_config
from training.data import DataError
from training.tasks import TASKS

log = logging.getLogger("training.fit")

# flag -> config key (values are parsed like overrides)
FLAGS = {
    "task": "task", "task_file": "task_file", "kind": "task_def.kind", "labels": "task_def.labels",
    "label_column": "task_def.label_column", "sequence_column": "task_def.sequence_column",
    "mask_column": "task_def.mask_column", "metric": "task_def.metric", "split": "task_def.split",
    "name": "name", "registry": "registry", "run_dir": "run_dir", "seed": "seed",
    "base": "model.restore_encoder_path", "rank": "model.peft.lora_tuning.adapter_dim",
    "alpha": "model.peft.lora_tuning.alpha", "dropout": "model.peft.lora_tuning.adapter_dropout",
    "init_a": "model.peft.lora_tuning.column_init_method",
    "init_b": "model.peft.lora_tuning.row_init_method",
    "layers": "model.peft.lora_tuning.layer_selection",
    "target_modules": "model.peft.lora_tuning.target_modules",
    "tie": "model.peft.lora_tuning.weight_tying",
    "position_embedding": "model.peft.lora_tuning.position_embedding_strategy",
    "restore_from": "model.peft.restore_from_path", "data_dir": "model.data.dataset_path",
    "train": "model.data.train", "val": "model.data.val", "test": "model.data.test",
    "batch_size": "model.micro_batch_size", "max_length": "model.max_length", "lr": "model.finetuning_optim.lr",
    "max_steps": "trainer.max_steps", "max_epochs": "trainer.max_epochs",
    "precision": "trainer.precision", "devices": "trainer.devices", "num_nodes": "trainer.num_nodes",
    "strategy": "trainer.strategy", "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "val_check_interval": "trainer.val_check_interval",
    "ray_workers": "ray.workers", "ray_address": "ray.address", "cpus_per_worker": "ray.cpus_per_worker",
    "gpus_per_worker": "ray.gpus_per_worker", "ray_token_file": "ray.token_file",
}
LIST_FLAGS = {"layers", "target_modules"}
STRING_FLAGS = {"task", "task_file", "kind", "labels", "label_column", "sequence_column", "mask_column", "metric",
                "split", "name", "registry", "run_dir", "base", "restore_from", "data_dir", "train", "val", "test",
                "ray_address", "ray_token_file"}


CHOICES = {"kind": ("per_residue", "sequence_class", "regression"), "init_a": ("xavier", "zero", "normal", "kaiming"),
           "init_b": ("xavier", "zero", "normal", "kaiming"), "position_embedding": ("none", "add")}


def default_of(key: str):
    """A config key's default, from the typed config itself."""
    value = FitConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def parser(**kwargs) -> argparse.ArgumentParser:
    """The command line (kwargs: argparse's, e.g. add_help=False to build on it: training.tune)."""
    p = argparse.ArgumentParser(**{"prog": "python -m training.fit", "description": __doc__,
                                   "formatter_class": argparse.RawDescriptionHelpFormatter, **kwargs})
    p.add_argument("--config", help="a yaml file, composed with its defaults list (BioNeMo's keys accepted)")
    p.add_argument("--config-path", "-cp", help="Hydra's form: the folder of --config-name (default: here)")
    p.add_argument("--config-name", "-cn", help="Hydra's form: a yaml in --config-path, without .yaml")
    p.add_argument("--mode", choices=("lora", "frozen", "full"),
                   help="lora (the default): adapters + head; frozen: head only; full: everything")
    for flag, key in FLAGS.items():
        names = ["--" + flag.replace("_", "-")] + (["--adapter-dim"] if flag == "rank" else [])  # BioNeMo's name
        extra = {"nargs": "?", "const": "true"} if flag == "tie" else {}  # bare --tie means true
        default = default_of(key)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        about = f"sets {key}" + (f" (default {shown})" if shown not in (None, "") else "") + \
            (" (comma-separated)" if flag in LIST_FLAGS else "")
        p.add_argument(*names, dest=flag, help=about, choices=CHOICES.get(flag), **extra)
    p.add_argument("--no-publish", action="store_true", help="train and evaluate only (sets publish=false)")
    p.add_argument("--list-tasks", action="store_true", help="print every known task and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides of any config key (Hydra's grammar)")
    return p


def parse_args(argv: list[str]) -> FitConfig | None:
    """The run's configuration from the command line (None: --list-tasks)."""
    args = parser().parse_args(argv)
    if args.list_tasks:
        return None
    return load_config(args.config, overrides_of(args), args.config_path, args.config_name)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The key=value overrides the flags and the positional overrides say, in order."""
    overrides = list(MODE_OVERRIDES[args.mode]) if args.mode else []
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag in LIST_FLAGS:
            value = "[" + value + "]"
        elif flag in STRING_FLAGS:  # a label set such as 0,1 or a name such as 1e5 stays a string
            value = json.dumps(value)
        overrides.append(f"{key}={value}")
    if args.no_publish:
        overrides.append("publish=false")
    return overrides + args.overrides


def list_tasks() -> str:
    rows = [("task", "kind", "labels", "metric", "default data", "split", "description")]
    for task in TASKS.values():
        labels = ",".join(task.labels) if task.labels else ("-" if task.kind == REGRESSION else "from data")
        data = task.default_data() or "-"
        rows.append((task.name, task.kind, labels if len(labels) < 40 else labels[:37] + "...", task.metric,
                     data.replace(str(Path.cwd()) + "/", ""), task.split or "-", task.description))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:6], widths)) + "  " + row[6] for row in rows)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        if config is None:
            print(list_tasks())
            return 0
        from training.run import run  # torch and Lightning load here, after the arguments are read
        summary = run(config)
    except (ConfigError, DataError, BundleError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
