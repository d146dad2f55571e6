"""The service's options: the Serve config's `args`, `serving.serve` flags and the chart's
`service.*` values all map onto ServiceConfig (one place for their defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from modeling import registry as store
from serving.engine.config import EngineConfig

LIMITS = store.ServeLimits()
SERVICER = "esm_adapters.v1.adapters_pb2_grpc.add_AdapterServiceServicer_to_server"
# grpc.health.v1, answered by the same deployment (AdapterServer.Check): Kubernetes' native gRPC probes
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
SERVICERS = [SERVICER, HEALTH_SERVICER]


@dataclass
class ServiceConfig:
    """Everything configurable; the Serve config's `args` and `serving.serve` flags map onto it."""
    registry: str = "adapters"
    base: str | None = None
    r_max: int = LIMITS.r_max
    max_device_adapters: int = EngineConfig.max_device_adapters
    max_cpu_bytes: int = EngineConfig.max_cpu_bytes  # the CPU tier of verified adapters, in bytes (LRU beyond it)
    targets: list[str] = field(default_factory=lambda: list(LIMITS.targets))
    merged: list[str] = field(default_factory=list)
    merge_top_k: int = 0
    device: str = "auto"
    dtype: str = "float32"  # or bfloat16 / float16: faster, within a stated tolerance (serving/engine/engine.py)
    quantize: str = "none"  # or int8: a W8A8 shared encoder on CPU replicas (serving/engine/int8.py)
    max_batch_size: int = 64
    # 0: a batch is whatever queued while the previous one ran (continuous batching); a positive
    # wait only adds latency to an idle replica (bench/grpc.py: +5 ms at concurrency 1).
    batch_wait_timeout_s: float = 0.0
    max_batch_residues: int | None = None  # None = by device (512 on CPU, 2048 int8 on CPU, 65536 on GPU)
    max_sequences_per_request: int = 256
    # Residues per call: Predict's sequences, Annotate's sequences x adapters, Embed's sequences.
    max_residues_per_request: int = 262144
    # Embed's per-residue output: floats per call (length x dim summed over the sequences); the
    # default is ~256 MB of response.
    max_embed_values: int = 64 * 2**20
    request_timeout_s: float = 60.0  # a call not answered by then gets DEADLINE_EXCEEDED
    registry_poll_s: float = 0.5
    torch_threads: int | None = None  # None = Ray's default (the replica's num_cpus); 0 = every core
    # Bearer-token auth on every RPC; None = $ESM_ADAPTERS_AUTH_TOKEN_FILE or $ESM_ADAPTERS_AUTH_TOKEN,
    # or no auth when neither is set (serving/serve/auth.py).
    auth_token_file: str | None = None

    @classmethod
    def from_args(cls, args: dict) -> "ServiceConfig":
        unknown = set(args) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown service options {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        args = dict(args)
        for f in fields(cls):  # a number of the wrong type is refused here, not deep inside a replica
            value, default = args.get(f.name), f.default
            if value is None or not isinstance(default, (int, float)) or isinstance(default, bool):
                continue
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                args[f.name] = value = float(value)
            if type(value) is not type(default):
                raise ValueError(f"service option {f.name}={value!r}: expected {type(default).__name__}")
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"service option {f.name}={value!r}: must not be negative")
        from serving.engine import torch_dtype
        from serving.engine.int8 import check_quantize
        torch_dtype(args.get("dtype", cls.dtype))  # refused here, before any replica starts
        check_quantize(args.get("quantize", cls.quantize), args.get("device", cls.device), args.get("dtype", cls.dtype))
        return cls(**args)
