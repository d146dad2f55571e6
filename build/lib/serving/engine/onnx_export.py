"""An adapter merged into the base, exported as an ONNX model (dynamic batch and length); the command
line is serving/batch/export_onnx.py, the runner serving/engine/onnx_runner.py.

The graph takes `tokens` (int64, batch x (length+2), <cls> seq <eos> <pad>...) and returns `outputs`:
per-residue logits (batch x length x classes) or per-sequence outputs (batch x classes).
The adapter ref, base fingerprint and output spec travel in the model's metadata.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from modeling.alphabet import PAD, tokenize
from modeling.encoder import reset_rotary_caches
from modeling.heads import PER_RESIDUE

OPSET = 17


class ExportModel(nn.Module):
    """Merged encoder + head, written without Python-side shape logic so tracing stays dynamic."""

    def __init__(self, encoder: nn.Module, head: nn.Module, kind: str):
        super().__init__()
        self.encoder, self.head, self.kind = encoder, head, kind

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = tokens.ne(PAD).sum(-1) - 2
        reps = self.encoder(tokens)[:, 1:-1]
        positions = torch.arange(reps.shape[1], device=tokens.device)
        mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
        return self.head(reps * mask.unsqueeze(-1).to(reps.dtype), mask)


def export(engine, ref: str, out: Path) -> Path:
    import onnx

    if engine.config.quantize != "none":  # torch's quantized kernels do not trace to ONNX
        raise ValueError(f"export from a float32 engine (this one serves quantize={engine.config.quantize})")
    adapter = engine.load(ref)
    encoder = engine.merged_encoder(adapter).cpu().float()  # the export is fp32 whatever the engine serves
    reset_rotary_caches(encoder)
    head = copy.deepcopy(adapter.head).cpu().float()  # the engine's own head stays on its device
    model = ExportModel(encoder, head, adapter.kind).eval()
    # Trace on a batch that contains padding (a padding-free trace would drop the mask path).
    example = tokenize(["MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAK"])
    axes = {"tokens": {0: "batch", 1: "tokens"}, "outputs": {0: "batch"}}
    if adapter.kind == PER_RESIDUE:
        axes["outputs"][1] = "residues"
    with torch.no_grad(), warnings.catch_warnings():
        # fair-esm's shape asserts trip TracerWarnings; they are checks, not data flow.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), str(out), input_names=["tokens"], output_names=["outputs"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    proto = onnx.load(str(out))
    meta = {"adapter": adapter.ref, "base_fingerprint": engine.fingerprint,
            "output": json.dumps(adapter.manifest["output"]), "kind": adapter.kind}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
    return out
