"""The batched multi-LoRA engine: one shared ESM-2, many adapters, mixed-adapter batches.

  engine.py     the Engine: tiers, batches, failure isolation     config.py   EngineConfig (light)
  adapters.py   a bundle -> a checked, packed adapter (CPU tier)  cpu_tier.py the CPU tier (LRU by bytes)
  slots.py      the device slot table                             multilora.py slot store, multi-LoRA linears
  head_batch.py heads of one shape run stacked                    decode.py   outputs -> answers
  merged.py     merged copies of hot adapters                     int8.py, graphs.py, onnx_runner.py: modes

The names below load on first use (PEP 562), so importing the light config does not load torch.
"""
from serving.engine.config import DTYPES, EngineConfig, torch_dtype

__all__ = ["DTYPES", "Engine", "EngineConfig", "InferenceError", "NoFreeSlot", "Prediction", "torch_dtype"]
_LAZY = {"Engine": "serving.engine.engine", "InferenceError": "serving.engine.engine",
         "Prediction": "serving.engine.decode", "NoFreeSlot": "serving.engine.slots"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'serving.engine' has no attribute {name!r}")
