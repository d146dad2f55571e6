"""Loading an adapter version: a verified bundle -> what the CPU tier keeps (packed LoRA + head).

Everything that could fail at inference is checked here, at load, where a failure refuses this
adapter alone: the serve rule on the full manifest, every LoRA tensor's shape against the base
layer it targets, the head's spec, weights and a trial forward with the output width the labels
need. A batch then never meets a head or slot it cannot run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from modeling import bundle as bundles
from modeling.heads import PER_RESIDUE, HeadSpec, build_head
from modeling.lora import PEFT_PREFIX
from serving.engine.multilora import PackedLora, SlotStore

# Bounded labels for refusal reasons (metrics must not carry free text).
REFUSAL_KINDS = ("fingerprint", "checksum", "r_max", "targets", "full fine-tuned", "shapes", "symlink", "finite",
                 "dtype", "safetensors", "edited", "changed", "head", "manifest")


def refusal_kind(reason: str) -> str:
    return next((k.split()[0] for k in REFUSAL_KINDS if k in reason), "other")


@dataclass
class LoadedAdapter:
    """CPU tier: a verified adapter version, ready to copy into a device slot. Its packed LoRA is
    kept for as long as it is referenced: a slot or merged copy is refilled from here, never from
    disk inside a batch. On a CPU device, while the adapter sits in a slot, `lora` is a view of that
    slot (host memory too), copied out when the slot is given up (serving/engine/engine.py)."""
    ref: str  # NAME@VERSION
    key: str  # ref and content identity (serving/registry/watcher.py Entry.key)
    manifest: dict
    lora: PackedLora | None  # in slot layout (serving/engine/multilora.py)
    head: nn.Module
    nbytes: int

    @property
    def kind(self) -> str:
        return self.manifest["output"]["kind"]

    @property
    def has_lora(self) -> bool:
        return self.lora is not None


def build_adapter(ref: str, key: str, bundle: bundles.Bundle, rule, store: SlotStore, device: torch.device,
                  dtype: torch.dtype) -> LoadedAdapter:
    """The adapter in a bundle, checked and packed for this engine; BundleError says what is wrong."""
    manifest = bundle.manifest
    if reason := rule(manifest):
        raise bundles.BundleError(reason)
    lora = pack_lora(bundle, store, pin=device.type == "cuda") if manifest["mode"] == "lora" else None
    head = load_head(manifest, bundle.head, device, dtype)
    nbytes = (lora.nbytes if lora else 0) + sum(p.numel() * p.element_size() for p in head.parameters())
    return LoadedAdapter(ref, key, manifest, lora, head, nbytes)


def pack_lora(bundle: bundles.Bundle, store: SlotStore, pin: bool) -> PackedLora | None:
    rank = bundle.manifest["lora"]["rank"]
    config = bundle.adapter_config
    if not isinstance(config, dict):
        raise bundles.BundleError(f"{bundles.ADAPTER_CONFIG} must be a JSON object")
    r, alpha = config.get("r", rank), config.get("lora_alpha", rank)
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0) or \
            not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise bundles.BundleError(f"{bundles.ADAPTER_CONFIG}: r must be a positive integer and lora_alpha a "
                                  f"number (r={str(r)[:20]}, lora_alpha={str(alpha)[:20]})")
    scale = float(alpha) / r
    layers = {}
    paths = {k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for k in bundle.adapter}
    for path in sorted(paths):
        if path not in store.shapes:
            raise bundles.BundleError(f"adapter targets {bundles.shown(path, 60)}, which this base/server does not have")
        a = bundle.adapter.get(f"{PEFT_PREFIX}{path}.lora_A.weight")
        b = bundle.adapter.get(f"{PEFT_PREFIX}{path}.lora_B.weight")
        bias = bundle.adapter.get(f"{PEFT_PREFIX}{path}.lora_B.bias")
        d_out, d_in = store.shapes[path]
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out \
                or a.shape[0] != b.shape[1] or a.shape[0] < 1 or (bias is not None and tuple(bias.shape) != (d_out,)):
            shapes = "/".join(str(tuple(t.shape)) if t is not None else "missing" for t in (a, b))
            raise bundles.BundleError(f"{path}: adapter shapes {shapes} do not fit the base linear ({d_out}x{d_in})")
        if a.shape[0] > store.r_max:
            raise bundles.BundleError(f"rank {a.shape[0]} exceeds this server's r_max {store.r_max}")
        layers[path] = (a, b, bias)
    if not layers:
        raise bundles.BundleError(f"{bundles.ADAPTER_WEIGHTS} holds no LoRA layer")
    # Packed once here, so a device slot fills with one copy; pinned so that copy is asynchronous.
    return store.pack(layers, scale, pin=pin)


def load_head(manifest: dict, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> nn.Module:
    output = manifest["output"]
    spec: HeadSpec = bundles.check_head(manifest["head"], output["kind"], len(output["labels"]) or 1)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        head = build_head(spec)
    try:
        head.load_state_dict(weights, assign=True)  # strict: a missing, extra or misshapen tensor fails
    except RuntimeError as exc:
        raise bundles.BundleError(f"{bundles.HEAD_WEIGHTS} does not fit the head spec: {str(exc)[:300]}") from None
    head = head.to(device, dtype).eval()
    with torch.no_grad():  # a trial forward: what a batch will do, on three positions of zeros
        reps = torch.zeros(1, 3, spec.embed_dim, device=device, dtype=dtype)
        out = head(reps, torch.ones(1, 3, dtype=torch.bool, device=device))
    want = (1, 3, spec.num_outputs) if spec.kind == PER_RESIDUE else (1, spec.num_outputs)
    if tuple(out.shape) != want:
        raise bundles.BundleError(f"the head answers {tuple(out.shape)}, expected {want}")
    return head
