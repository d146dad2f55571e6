"""Training configuration: defaults, a yaml file, dotted overrides, and BioNeMo's key names.

Keys follow BioNeMo's ESM-2 downstream/LoRA yaml (model.peft.lora_tuning.adapter_dim,
model.encoder_frozen, model.restore_encoder_path, model.data.task_type, ...) so such a yaml runs as
is. BioNeMo keys that do not change what is learned (exp_manager, parallelism, NeMo targets) are
accepted and reported as ignored; any other unknown key is an error naming the nearest valid key.
"""
from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any

import yaml

from modeling.lora import ATTENTION_TARGETS

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "task": None,  # a built-in task or a new task's name; None = sec_str, the task file's, or task_name's
    "task_file": None,  # a task declaration in yaml (training/tasks/*.yaml show the form)
    "task_def": {  # the fields of a task declared (or changed) on the command line
        "kind": None, "labels": None, "label_column": None, "sequence_column": None, "mask_column": None,
        "metric": None, "split": None,
    },
    "name": None,  # adapter name in the registry; default <task>-r<rank> (or <task>-frozen/-full)
    "registry": "adapters",
    "run_dir": "runs",
    "seed": 0,
    "do_training": True,
    "do_testing": True,
    "score_val": True,  # score the whole validation split once more at the end (for the manifest)
    "publish": True,
    "trainer": {
        "accelerator": "auto", "devices": "auto", "num_nodes": 1, "strategy": "auto",
        "precision": "32-true", "max_steps": -1, "max_epochs": 3, "accumulate_grad_batches": 1,
        "val_check_interval": 1.0, "limit_train_batches": 1.0, "limit_val_batches": 1.0,
        "gradient_clip_val": 1.0, "log_every_n_steps": 10, "num_sanity_val_steps": 0,
    },
    "early_stopping": {"enabled": True, "patience": 3},
    # Train under Ray Train instead of in this process: workers > 0 (a local Ray, or --ray-address)
    "ray": {"workers": 0, "address": None, "cpus_per_worker": 1, "gpus_per_worker": 0, "token_file": None},
    "model": {
        "restore_encoder_path": None,  # --base: fair-esm .pt, HF folder, model name; None = default
        "encoder_frozen": True,
        "micro_batch_size": 8,
        "max_length": 1022,  # training crop (residues); evaluation always sees up to 1022
        "head": {"hidden": 32, "dropout": 0.25, "kernel": 7},
        "peft": {
            "enabled": True,
            "restore_from_path": None,  # an adapter bundle folder or registry NAME[@VERSION]
            "lora_tuning": {
                "adapter_dim": 16, "alpha": None, "adapter_dropout": 0.0,
                "column_init_method": "xavier", "row_init_method": "zero",
                "layer_selection": None, "target_modules": list(ATTENTION_TARGETS),
                "weight_tying": False, "position_embedding_strategy": None,
            },
        },
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 100,
                  "encoder_lr": None},  # encoder_lr: LoRA/encoder parameters (default = lr)
        "data": {"dataset_path": None, "train": None, "val": None, "test": None,
                 "val_fraction": 0.1, "num_workers": 0, "bucket_batches": 50,
                 # BioNeMo's task keys, as BioNeMo means them (training/bionemo.py)
                 "task_name": None, "task_type": None, "sequence_column": None, "target_column": None,
                 "target_sizes": None, "mask_column": None, "num_classes": None,
                 "dataset": {"train": None, "val": None, "test": None}},
    },
}

# BioNeMo spellings of our keys.
ALIASES = {
    "model.finetuning_optim": "model.optim",
    "model.cnn_dim": "model.head.hidden",
    "model.dropout_rate": "model.head.dropout",
    "model.peft.lora_tuning.rank": "model.peft.lora_tuning.adapter_dim",
    "model.peft.lora_tuning.dropout": "model.peft.lora_tuning.adapter_dropout",
}
# BioNeMo/NeMo keys accepted without effect (prefix match).
IGNORED = (
    "defaults", "hydra", "exp_manager", "target", "infer_target", "do_preprocessing",
    "restore_from_path", "model.global_batch_size", "model.post_process", "model.loss_func",
    "model.tensor_model_parallel_size", "model.pipeline_model_parallel_size", "model.seq_length",
    "model.precision", "model.encoder_cfg", "model.data.preprocessed_data_path", "model.data.shuffle",
    "model.optim.betas", "model.optim.sched",
    "model.finetuning_optim.betas", "model.finetuning_optim.sched", "model.peft.peft_scheme",
    "trainer.logger", "trainer.enable_checkpointing", "trainer.use_distributed_sampler",
    "trainer.replace_sampler_ddp", "trainer.benchmark",
)


class ConfigError(ValueError):
    pass


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


VALID_KEYS = flatten(DEFAULTS)
_SECTIONS = {k.rsplit(".", i)[0] for k in VALID_KEYS for i in range(1, k.count(".") + 1)}


def _canonical(key: str) -> str:
    for alias, target in ALIASES.items():
        if key == alias or key.startswith(alias + "."):
            return target + key[len(alias):]
    return key


def _check_type(key: str, value: Any) -> Any:
    default = VALID_KEYS[key]
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
    elif isinstance(default, int) and not isinstance(value, int) and key not in (
            "trainer.val_check_interval", "trainer.limit_train_batches", "trainer.limit_val_batches"):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif isinstance(default, float) and not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return value


def set_key(config: dict, key: str, value: Any) -> None:
    key = _canonical(key)
    if key.startswith(IGNORED) and not (key in VALID_KEYS or key in _SECTIONS):
        log.warning("config key %s is a BioNeMo/NeMo setting with no effect here; ignored", key)
        return
    if isinstance(value, dict) and (key in _SECTIONS or key == ""):
        for sub, sub_value in value.items():
            set_key(config, f"{key}.{sub}" if key else sub, sub_value)
        return
    if key not in VALID_KEYS:
        near = difflib.get_close_matches(key, list(VALID_KEYS), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = _check_type(key, value)


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. model.optim.lr=1e-4")
    key = key.strip().lstrip("+")  # hydra's +key=value
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, str) and key in VALID_KEYS and isinstance(VALID_KEYS[key], float):
        try:
            value = float(value)  # YAML reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    config = copy.deepcopy(DEFAULTS)
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        set_key(config, "", data)
    for text in overrides:
        set_key(config, *parse_override(text))
    return config


def mode_of(config: dict) -> str:
    """lora / frozen / full, from BioNeMo's peft.enabled and encoder_frozen."""
    if config["model"]["peft"]["enabled"]:
        return "lora"
    return "frozen" if config["model"]["encoder_frozen"] else "full"


def mode_overrides(mode: str) -> list[str]:
    return {"lora": ["model.peft.enabled=true", "model.encoder_frozen=true"],
            "frozen": ["model.peft.enabled=false", "model.encoder_frozen=true"],
            "full": ["model.peft.enabled=false", "model.encoder_frozen=false"]}[mode]
