"""An INT8 shared encoder for CPU serving: W8A8 linear layers, everything else in float32.

Weights are quantized once at load, symmetric, one scale per output channel. Activations are
quantized per call (dynamic, one scale per tensor, computed by the kernel from the batch itself):
no calibration set to ship or to go stale, and a protein unlike any calibration data cannot be
clipped. The int8 x int8 products run in torch's quantized CPU kernels (fbgemm / oneDNN with
VNNI or AMX where the CPU has them). LoRA terms, heads, layer norms, attention and softmax stay in
float32, so an adapter trained on the float32 base serves unchanged. One activation scale per
call means an answer depends slightly on the sequences that share its forward pass (within the
tolerance tests/test_engine.py states); per-row calls would remove most of that, for 21% less
throughput.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn


@functools.cache
def kernel_missing() -> str | None:
    """Why a tiny Int8Linear cannot run here, or None (probed once per process: every start checks)."""
    try:
        Int8Linear(nn.Linear(4, 4))(torch.zeros(1, 4))
    except (RuntimeError, AttributeError) as exc:  # no quantized engine / kernels in this torch build
        return f"quantized engines {torch.backends.quantized.supported_engines}: {exc}"
    return None


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (per output channel) and activations quantized per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to("cpu", torch.float32)
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():
            # torch 2.13 marks quantized tensor dtypes deprecated (pytorch#184982) but still ships the
            # fused dynamic-quantization kernels that need them; check_quantize refuses once they go.
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long),
                                                 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32)
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: full 8-bit activations (the kernels accumulate in int32).
        return torch.ops.quantized.linear_dynamic(x, self._packed, False)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dequantized float32 weight, bias): what the layer computes with, in nn.Linear's form."""
        qweight, bias = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize(), bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # As an nn.Linear's: a merged copy of the encoder is built from the state the base serves with.
        weight, bias = self.unpacked()
        destination[prefix + "weight"] = weight
        if bias is not None:
            destination[prefix + "bias"] = bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear under `module` (in place) with an Int8Linear; returns `module`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return module
