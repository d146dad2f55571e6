"""Offline jobs on the engine: Ray Data batch scoring (`python -m serving.batch`), ONNX export."""
from serving.batch.scoring import BatchError, input_files, main, parser, run

__all__ = ["BatchError", "input_files", "main", "parser", "run"]
