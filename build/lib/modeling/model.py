"""Encoder + head: the whole task model, used by training, evaluation and reference serving."""
from __future__ import annotations

import copy

import torch
from torch import nn

from modeling.alphabet import PAD
from modeling.heads import HeadSpec, build_head, residues


class TaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, head_spec: HeadSpec):
        super().__init__()
        self.encoder = encoder
        self.head_spec = head_spec
        self.head = build_head(head_spec)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (outputs, residue mask). Per-residue outputs are (B, L, C), others (B, C)."""
        lengths = tokens.ne(PAD).sum(-1) - 2
        # Width from the shape, not from `lengths` (reading that makes the host wait for the device).
        reps, mask = residues(self.encoder(tokens), lengths, width=tokens.shape[1] - 2)
        return self.head(reps, mask), mask


def lora_config_from_json(config: dict):
    from peft import LoraConfig
    fields = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in config.items() if k in fields and k != "peft_type"})


def load_task_model(encoder: nn.Module, bundle) -> TaskModel:
    """A stand-alone model for one bundle: a copy of the base with the adapter injected by peft
    from the bundle's own PEFT files (the reference the serving engine is checked against)."""
    from peft import inject_adapter_in_model

    from modeling.bundle import BundleError
    from modeling.lora import PEFT_PREFIX

    encoder = copy.deepcopy(encoder)
    mode = bundle.manifest["mode"]
    if mode == "lora":
        inject_adapter_in_model(lora_config_from_json(bundle.adapter_config), encoder)
        state = {}
        for key, value in bundle.adapter.items():
            key = key.removeprefix(PEFT_PREFIX)
            for part in (".lora_A.", ".lora_B."):
                key = key.replace(part, part + "default.")
            state[key] = value
        expected = {k for k in encoder.state_dict() if ".lora_" in k}
        if set(state) != expected:
            raise BundleError(f"{bundle.folder}: adapter tensors do not match adapter_config.json "
                              f"(missing {sorted(expected - set(state))[:3]}, "
                              f"unexpected {sorted(set(state) - expected)[:3]})")
        encoder.load_state_dict(state, strict=False)
    elif mode == "full":
        encoder.load_state_dict(bundle.encoder)
    head_spec = HeadSpec(**bundle.manifest["head"])
    model = TaskModel(encoder, head_spec)
    model.head.load_state_dict(bundle.head)
    return model.eval()
