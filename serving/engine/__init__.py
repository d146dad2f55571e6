"""The batched multi-LoRA engine: one shared ESM-2, many adapters, mixed-adapter batches."""
from serving.engine.engine import DTYPES, Engine, EngineConfig, NoFreeSlot, Prediction, torch_dtype

__all__ = ["DTYPES", "Engine", "EngineConfig", "NoFreeSlot", "Prediction", "torch_dtype"]
