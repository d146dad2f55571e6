"""Build real adapter bundles with random weights on a given base (for engine/registry tests)."""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modeling import bundle as bundles
from modeling import registry as store
from modeling.heads import HeadSpec, PER_RESIDUE, REGRESSION, SEQUENCE_CLASS
from modeling.lora import LoraSpec, add_lora, export_adapter
from modeling.model import TaskModel

LABELS = {PER_RESIDUE: ["H", "E", "C"], SEQUENCE_CLASS: ["a", "b", "c", "d"], REGRESSION: []}


def refs(keys) -> set[str]:
    """NAME@VERSION of each cache key (NAME@VERSION#identity) in an engine tier."""
    return {key.partition("#")[0] for key in keys}


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
    staged = store.staging_dir(registry)
    bundles.write_bundle(staged, manifest, tensors, json_files)
    return store.publish(staged, registry, name)


def make_constant_bundle(base, registry: Path, name: str, value: float, seed: int = 0) -> Path:
    """A regression adapter whose answer is `value` for every sequence (its head ignores the
    encoder), so a response names the adapter and version that produced it. Built aside, then
    published into `registry` in one atomic step."""
    with tempfile.TemporaryDirectory() as scratch:
        built = make_bundle(base, Path(scratch), name, kind=REGRESSION, rank=2, seed=seed)
        head = load_file(built / bundles.HEAD_WEIGHTS)
        for tensor in head.values():
            tensor.zero_()
        manifest = json.loads((built / bundles.MANIFEST).read_text())
        output = manifest["output"]
        head[sorted(k for k in head if k.endswith("bias"))[-1]].fill_(
            (value - output["target_mean"]) / output["target_std"])
        save_file(head, built / bundles.HEAD_WEIGHTS)
        manifest["files"] = {f: bundles.sha256_file(built / f) for f in manifest["files"]}
        (built / bundles.MANIFEST).write_text(json.dumps(manifest))
        staged = store.staging_dir(registry)
        shutil.copytree(built, staged, dirs_exist_ok=True)
        return store.publish(staged, registry, name)
