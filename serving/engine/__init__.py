"""The batched multi-LoRA engine: one shared ESM-2, many adapters, mixed-adapter batches.

  engine.py     the Engine: tiers, batches, failure isolation     config.py   EngineConfig
  adapters.py   a bundle -> a checked, packed adapter (CPU tier)  cpu_tier.py the CPU tier (LRU by bytes)
  slots.py      the device slot table                             multilora.py slot store, multi-LoRA linears
  head_batch.py heads of one shape run stacked                    decode.py   outputs -> answers
  merged.py     merged copies of hot adapters                     int8.py, graphs.py, onnx_runner.py: modes
"""
from serving.engine.config import DTYPES, EngineConfig, torch_dtype
from serving.engine.decode import Prediction
from serving.engine.engine import Engine, InferenceError
from serving.engine.slots import NoFreeSlot

__all__ = ["DTYPES", "Engine", "EngineConfig", "InferenceError", "NoFreeSlot", "Prediction", "torch_dtype"]
