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


def resign(folder: Path) -> None:
    """Recompute the manifest's checksums after a deliberate change to a bundle's files."""
    manifest = json.loads((folder / bundles.MANIFEST).read_text())
    manifest["files"] = {f: bundles.sha256_file(folder / f) for f in manifest["files"]}
    (folder / bundles.MANIFEST).write_text(json.dumps(manifest))


def rewrite_adapter(folder: Path, change) -> None:
    """change(LoRA tensors) in place, then re-sign: a bundle whose checksums still hold."""
    tensors = load_file(folder / bundles.ADAPTER_WEIGHTS)
    change(tensors)
    save_file(tensors, folder / bundles.ADAPTER_WEIGHTS)
    resign(folder)


def with_other_lora(source: Path, target: Path, seed: int) -> Path:
    """A copy of the bundle at `source` with other random LoRA weights and the same head: its
    answers differ from the source's only through the LoRA terms."""
    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(seed)
    rewrite_adapter(target, lambda tensors: [t.copy_(torch.randn(t.shape, generator=generator) * 0.2)
                                             for t in tensors.values()])
    return target


def push_and_remove(root: str, source: str, count: int, queue) -> None:
    """`count` times: push `source` as "shared", then remove that version (a process of its own)."""
    got = []
    for _ in range(count):
        folder = store.push(source, root, "shared")
        got.append(int(folder.name))
        store.remove(root, f"shared@{folder.name}")
    queue.put(got)


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
