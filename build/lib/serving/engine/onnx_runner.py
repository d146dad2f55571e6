"""Run an exported adapter model with onnxruntime (CUDA provider where available, else CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class OnnxModel:
    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.adapter = meta["adapter"]
        self.base_fingerprint = meta["base_fingerprint"]
        self.output = json.loads(meta["output"])
        self.kind = meta["kind"]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {"tokens": tokens.cpu().numpy().astype(np.int64)})
        return torch.from_numpy(out)
