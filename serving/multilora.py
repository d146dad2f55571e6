"""Batched multi-LoRA linear layers (Punica's BGMV idea in plain torch).

Each targeted nn.Linear of the shared base is wrapped; the wrapper holds stacked slot tensors
  A[slots, r_max, d_in], B[slots, d_out, r_max] (scale folded in), bias[slots, d_out] (if any)
and reads one slot index per sequence from a shared `SlotContext`. Slot 0 stays all zeros (no
adapter). The LoRA term is two batched matmuls over the gathered slots, so the number of kernel
launches per layer is the same whether a batch holds 1 or 64 distinct adapters.
Inputs are batch-first (B, T, d_in), as the encoder's layers run.
"""
from __future__ import annotations

import torch
from torch import nn


class SlotContext:
    """The slot index of every sequence in the batch being run (None = base only)."""

    def __init__(self):
        self.slots: torch.Tensor | None = None


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, num_slots: int, r_max: int, context: SlotContext):
        super().__init__()
        self.base = base
        self.context = context
        d_out, d_in = base.weight.shape
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("lora_a", torch.zeros(num_slots, r_max, d_in, **kw))
        self.register_buffer("lora_b", torch.zeros(num_slots, d_out, r_max, **kw))
        # Only adapters trained with position_embedding_strategy=add carry a bias: allocated on first use.
        self.register_buffer("lora_bias", None)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the wrapped linear, whatever form its weight takes (float or int8)."""
        return self.lora_b.shape[1], self.lora_a.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        slots = self.context.slots
        if slots is None:
            return y
        h = torch.bmm(x, self.lora_a[slots].transpose(1, 2))  # (B, T, r)
        if self.lora_bias is not None:
            y += self.lora_bias[slots].unsqueeze(1)
        # Added into y by the matmul itself: a separate delta and sum cost two more passes over the
        # activations, more than the base matmul at 650M (bench/results, H200 profile).
        return y.baddbmm_(h, self.lora_b[slots].transpose(1, 2))

    def load_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float,
                  bias: torch.Tensor | None) -> None:
        """Copy one adapter into `slot`; ranks below r_max are zero-padded."""
        rank = a.shape[0]
        self.clear_slot(slot)
        self.lora_a[slot, :rank].copy_(a, non_blocking=True)
        self.lora_b[slot, :, :rank].copy_(b * scale, non_blocking=True)
        if bias is not None:
            if self.lora_bias is None:
                zeros = self.lora_a.new_zeros(self.lora_a.shape[0], self.lora_b.shape[1])
                if zeros.is_cuda:  # zeroed on the copy stream: finish before a batch on another stream reads it
                    torch.cuda.current_stream(zeros.device).synchronize()
                self.lora_bias = zeros
            self.lora_bias[slot].copy_(bias * scale, non_blocking=True)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if self.lora_bias is not None:
            self.lora_bias[slot].zero_()


def wrap_targets(encoder: nn.Module, targets: tuple[str, ...], num_slots: int, r_max: int,
                 context: SlotContext) -> dict[str, MultiLoraLinear]:
    """Replace every targeted Linear of `encoder` in place; returns {module path: wrapper}."""
    wrapped = {}
    for name, module in list(encoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                wrapper = MultiLoraLinear(child, num_slots, r_max, context)
                setattr(module, child_name, wrapper)
                wrapped[f"{name}.{child_name}" if name else child_name] = wrapper
    return wrapped
