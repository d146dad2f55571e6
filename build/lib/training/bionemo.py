"""BioNeMo's configuration keys, read as BioNeMo (v1.8, NeMo underneath) means them.

A composed BioNeMo downstream file holds three kinds of keys besides this project's own:
- keys with another name here (ALIASES), or a meaning to translate (`max_seq_length` counts
  tokens, `max_length` residues; `cnn_dim` sizes per-residue heads, `hidden_layer_size` pooled
  ones; a `finetuning_optim` without `sched` means a constant learning rate, as in NeMo);
- keys that describe the checkpoint (CHECKPOINT): the base actually loaded decides them, and a
  yaml value that disagrees is reported as overridden by the checkpoint (training/fit.py);
- keys that cannot change what is learned here (IGNORED, with the reason): logging, parallelism,
  pretraining-only settings, speed and memory switches, flags of the checkpoint's architecture.
Interpolations (`${...}`, `${oc.env:...}`, NeMo's `${multiply:...}`) are resolved only for keys
this project uses: an unset variable in an ignored key is no error, in a used key a clear one.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from training.config import VALID_KEYS, ConfigError, Notes, nearest

OmegaConf.register_new_resolver("multiply", lambda a, b: a * b, replace=True)  # NeMo's

ALIASES = {
    "model.dropout_rate": "model.head.dropout",
    "model.accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "model.modify_percent": "model.data.modify_percent",
    "model.seed": "seed",
    "model.finetuning_optim.warmup_steps": "model.finetuning_optim.sched.warmup_steps",  # this project's earlier key
    "model.peft.lora_tuning.rank": "model.peft.lora_tuning.adapter_dim",
    "model.peft.lora_tuning.dropout": "model.peft.lora_tuning.adapter_dropout",
}
CHECKPOINT = ("model.num_layers", "model.hidden_size", "model.ffn_hidden_size", "model.num_attention_heads",
              "model.seq_length", "model.tokenizer.model_name")
_REASONS = {
    "experiment logging": ("hydra", "exp_manager", "trainer.logger", "trainer.enable_checkpointing",
                           "trainer.benchmark"),
    "NeMo's class paths": ("infer_target",),
    "data preparation done elsewhere": ("do_preprocessing", "model.data.preprocessed_data_path",
                                        "model.data.ngc_registry_target", "model.data.ngc_registry_version",
                                        "model.data.preprocessing", "model.data.index_mapping_dir",
                                        "model.data.force_regen_sample_mapping", "model.data.skip_lines"),
    "model parallelism and batch bookkeeping": (
        "model.global_batch_size", "model.tensor_model_parallel_size", "model.pipeline_model_parallel_size",
        "trainer.use_distributed_sampler", "trainer.replace_sampler_ddp", "model.data.dataloader_type",
        "model.data.drop_last", "model.drop_last", "model.data.shuffle", "model.data.emb_batch_size"),
    "speed or memory only": ("model.megatron_amp_O2", "model.activations_checkpoint_method",
                             "model.activations_checkpoint_num_layers", "model.bias_gelu_fusion",
                             "model.masked_softmax_fusion", "model.use_cpu_initialization", "model.native_amp_init_scale",
                             "model.native_amp_growth_interval", "model.fp16_lm_cross_entropy", "model.onnx_safe",
                             "model.data.pin_memory", "model.data.dynamic_padding"),
    "pretraining only": ("model.optim", "model.dwnstr_task_validation", "model.resume_from_checkpoint",
                         "model.data.data_prefix", "model.data.reset_position_ids", "model.data.reset_attention_mask",
                         "model.data.eod_mask_loss", "model.init_method_std", "model.bert_binary_head",
                         "model.finetuning_optim.sched.last_epoch", "model.finetuning_optim.sched.max_steps"),
    "fixed by the checkpoint": ("model.megatron_legacy", "model.position_embedding_type", "model.hidden_dropout",
                                "model.embedding_use_attention_mask", "model.embedding_token_dropout",
                                "model.mask_token_id", "model.attention_dropout", "model.normalize_attention_scores",
                                "model.use_esm_attention", "model.esm_gelu", "model.use_pt_layernorm",
                                "model.use_pt_mlp_out", "model.max_position_embeddings", "model.encoder_seq_length",
                                "model.kv_channels", "model.apply_query_key_layer_scaling", "model.layernorm_epsilon",
                                "model.make_vocab_size_divisible_by", "model.pre_process", "model.post_process",
                                "model.fp32_residual_connection", "model.tokenizer", "model.encoder_cfg",
                                "model.precision"),
}
IGNORED = {prefix: reason for reason, prefixes in _REASONS.items() for prefix in prefixes}


def cli_key(override: str) -> str:
    """A command-line override as composed: this project's `model.optim.*` is the fine-tuning
    optimizer, which BioNeMo's files call `model.finetuning_optim` (their `model.optim` is the
    pretraining one)."""
    key, _, value = override.partition("=")
    if key == "model.optim" or key.startswith("model.optim."):
        key = "model.finetuning_optim" + key[len("model.optim"):]
    return f"{key}={value}"


def ignored_reason(key: str) -> str | None:
    for prefix, reason in IGNORED.items():
        if key == prefix or key.startswith(prefix + "."):
            return reason
    return None


def leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in ("model.data.train", "model.data.val", "model.data.test"):
            out.update(leaves(value, path + "."))
        else:
            out[path] = value
    return out


def translate(composed: DictConfig, notes: Notes, written: DictConfig | None = None) -> dict[str, Any]:
    """The composed tree -> {key of FitConfig: resolved value}; notes get what was ignored and what
    describes the checkpoint. `written`: the files' composition without the command line."""
    raw = OmegaConf.to_container(composed, resolve=False)
    found = leaves(raw)
    if "finetuning_optim" not in raw.get("model", {}) and "model.optim" in {k[:11] for k in found}:
        # this project's earlier name for the fine-tuning optimizer, in a file of its own
        found = {("model.finetuning_optim" + k[11:] if k.startswith("model.optim.") else k): v for k, v in found.items()}
    values: dict[str, Any] = {}
    for key, as_written in found.items():
        if key in ("model.data.train", "model.data.val", "model.data.test") and isinstance(as_written, dict):
            notes.ignored.append(f"{key} (pretraining only)")  # BioNeMo's pretraining dataset settings
            continue
        if reason := ignored_reason(key):
            notes.ignored.append(f"{key} ({reason})")
            continue
        if key == "target":
            continue  # read below
        if key in CHECKPOINT:
            try:
                notes.checkpoint[key] = resolve(composed, key)
            except ConfigError:
                pass  # a claim that cannot be read is no claim
            continue
        value = resolve(composed, key)
        if key == "restore_from_path":
            if value is not None:
                raise ConfigError(f"restore_from_path={value!r} restores a whole BioNeMo (.nemo) model, which is "
                                  f"not read here: give model.restore_encoder_path (the base) and "
                                  f"model.peft.restore_from_path (an adapter bundle) instead")
            notes.ignored.append(f"{key} (null: nothing to restore)")
        elif key == "model.peft.peft_scheme":
            if str(value).lower() != "lora":
                raise ConfigError(f"model.peft.peft_scheme={value!r}: only lora is trained here")
            notes.ignored.append(f"{key} (lora, the only scheme here)")
        elif key in ("model.cnn_dim", "model.hidden_layer_size"):
            notes.head_sizes["per_residue" if key == "model.cnn_dim" else "sequence"] = value
        elif key == "model.data.max_seq_length":  # tokens, <cls> and <eos> included
            if value is not None:
                values["model.max_length"] = max(1, min(int(value) - 2, 1022))
        else:
            target = next((new + key[len(old):] for old, new in ALIASES.items()
                           if key == old or key.startswith(old + ".")), key)
            if target not in VALID_KEYS:
                raise ConfigError(f"unknown config key {key!r}{nearest(target)}")
            values[target] = value
    if "target" in found and "model.peft.enabled" not in found:  # BioNeMo's model class decides
        values["model.peft.enabled"] = "LoRA" in str(found["target"])
        notes.ignored.append(f"target ({found['target']}: peft {'on' if values['model.peft.enabled'] else 'off'})")
    if any(k.startswith("model.finetuning_optim.sched.") for k in found) and \
            "model.finetuning_optim.sched.warmup_steps" not in found:
        values["model.finetuning_optim.sched.warmup_steps"] = None  # NeMo: from warmup_ratio, else none
    files = leaves(OmegaConf.to_container(written, resolve=False)) if written is not None else {}
    if any(k.startswith("model.finetuning_optim.") for k in files) and \
            not any(k.startswith("model.finetuning_optim.sched.") for k in found):
        values.update({"model.finetuning_optim.sched.name": "constant",  # NeMo: no sched, no schedule
                       "model.finetuning_optim.sched.warmup_steps": 0})
    return values


def resolve(composed: DictConfig, key: str) -> Any:
    """The value of `key` with its interpolations resolved; a clear error if one cannot be."""
    try:
        value = OmegaConf.select(composed, key, throw_on_resolution_failure=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        written = OmegaConf.to_container(composed, resolve=False)
        for part in key.split("."):
            written = written.get(part) if isinstance(written, dict) else None
        raise ConfigError(f"{key}: {written!r} cannot be resolved ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}); set what it refers to, or give {key}=... on the "
                          f"command line") from None
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
