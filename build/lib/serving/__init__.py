"""Serving, in floors: `registry` (watch the registry folder, per-version status), `engine` (the
batched multi-LoRA engine: tiers, slots, batches, decoding), `serve` (the gRPC service on Ray Serve
and its fronts), `batch` (offline jobs: Ray Data scoring, ONNX export), `client` (calling a service)."""
