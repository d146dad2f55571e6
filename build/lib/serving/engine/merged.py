"""Merged copies: a hot adapter folded into a dedicated copy of the encoder (W + s·B·A), so its
batches skip the LoRA terms. The shared base is never modified in place."""
from __future__ import annotations

import torch
from torch import nn

from modeling.encoder import EncoderShape, EsmEncoder
from serving.engine.int8 import quantize_linears
from serving.engine.multilora import PackedLora, SlotStore


def merged_encoder(shape: EncoderShape, base_state: dict[str, torch.Tensor], store: SlotStore,
                   lora: PackedLora | None, device: torch.device, dtype: torch.dtype, int8: bool) -> nn.Module:
    """A copy of the base (its weights `base_state`) with the adapter's LoRA folded in, in float32,
    then quantised (int8) or cast to the serving dtype, as the shared encoder is."""
    with torch.device(device):  # built where it will run: a 650M init on the host takes seconds
        merged = EsmEncoder(shape)
    merged.load_state_dict(base_state)  # a copy: the shared weights stay untouched
    merged = merged.eval()
    modules = dict(merged.named_modules())
    with torch.no_grad():
        if lora is not None:
            for path, (a, b, bias) in store.unpack(lora).items():
                linear = modules[path]
                linear.weight += (b @ a).to(device)  # the scale is in b already
                if bias is not None:
                    linear.bias += bias.to(device)
    if int8:
        quantize_linears(merged)  # after merging: the copy runs as the shared encoder does
    return merged.to(dtype)
