"""Build real adapter bundles with random weights on a given base (for engine/registry tests)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from modeling import bundle as bundles
from modeling.heads import HeadSpec, PER_RESIDUE, REGRESSION, SEQUENCE_CLASS
from modeling.lora import LoraSpec, add_lora, export_adapter
from modeling.model import TaskModel

LABELS = {PER_RESIDUE: ["H", "E", "C"], SEQUENCE_CLASS: ["a", "b", "c", "d"], REGRESSION: []}


def make_bundle(base, registry: Path, name: str, rank: int = 4, kind: str = PER_RESIDUE,
                seed: int = 0, spec: LoraSpec | None = None, mode: str = "lora", **manifest_extra) -> Path:
    torch.manual_seed(seed)
    encoder = copy.deepcopy(base.encoder)
    spec = spec or LoraSpec(rank=rank, alpha=2.0 * rank)
    layers = encoder.shape.num_layers
    if mode == "lora":
        add_lora(encoder, spec, layers)
        for n, p in encoder.named_parameters():
            if p.requires_grad or n.endswith("lora_position"):
                p.data.normal_(0, 0.2)
    labels = LABELS[kind]
    model = TaskModel(encoder, HeadSpec(kind, len(labels) or 1, encoder.embed_dim, hidden=8))
    tensors = {bundles.HEAD_WEIGHTS: model.head.state_dict()}
    json_files = {}
    if mode == "lora":
        config, adapter = export_adapter(encoder, spec, layers)
        tensors[bundles.ADAPTER_WEIGHTS] = adapter
        json_files[bundles.ADAPTER_CONFIG] = config
    output = {"kind": kind, "labels": labels}
    if kind == REGRESSION:
        output.update(target_mean=5.0, target_std=2.0)
    manifest = {"task": "test", "mode": mode, "output": output, "head": model.head_spec.as_dict(),
                "lora": spec.as_dict() if mode == "lora" else None,
                "base": {"fingerprint": base.fingerprint}, "metrics": {}, **manifest_extra}
    staged = bundles.staging_dir(registry)
    bundles.write_bundle(staged, manifest, tensors, json_files)
    return bundles.publish(staged, registry, name)
