"""The service's options: the Serve config's `args`, `serving.serve` flags and the chart's
`service.*` values all map onto ServiceConfig (one place for their defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from esm_adapters.client import TOKEN_ENV, TOKEN_FILE_ENV
from modeling import registry as store
from serving.engine.config import DTYPES, QUANTIZE, EngineConfig

LIMITS = store.ServeLimits()
SERVICER = "esm_adapters.v1.adapters_pb2_grpc.add_AdapterServiceServicer_to_server"
# grpc.health.v1, answered by the same deployment (AdapterServer.Check): Kubernetes' native gRPC probes
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
SERVICERS = [SERVICER, HEALTH_SERVICER]


def option(default, help: str, **kwargs):
    """A ServiceConfig field with its help text (the `serving.serve` flag and the docs read it)."""
    factory = kwargs.pop("factory", None)
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ServiceConfig:
    """Everything configurable; the Serve config's `args` and `serving.serve` flags map onto it."""
    registry: str = option("adapters", "the registry folder every replica reads")
    base: str | None = option(None, "the shared base: a model name (esm2_t33_650M_UR50D), a fair-esm .pt or a "
                              "Hugging Face folder; none = the offline default base")
    r_max: int = option(LIMITS.r_max, "the largest LoRA rank served (device slots are this wide)")
    max_device_adapters: int = option(EngineConfig.max_device_adapters, "device slots: adapters resident at once "
                                      "on the device")
    max_cpu_bytes: int = option(EngineConfig.max_cpu_bytes, "the CPU tier of verified adapters, in bytes (LRU "
                                "beyond it; 650M rank 16, every target served: ~49 MB each)")
    targets: list[str] = option(None, "LoRA target modules served (comma-separated)", factory=lambda: list(LIMITS.targets),
                                choices=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
    merged: list[str] = option(None, "adapters always served from a merged copy (comma-separated names)", factory=list)
    merge_top_k: int = option(0, "also serve the K busiest adapters from merged copies (the others' copies are freed)")
    device: str = option("auto", "auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    dtype: str = option("float32", "weights and activations: bfloat16/float16 are faster, within a stated tolerance",
                        choices=DTYPES)
    quantize: str = option("none", "int8: a W8A8 shared encoder on CPU replicas (float32 adapters)", choices=QUANTIZE)
    packed: bool | None = option(None, "run the encoder on each batch's real tokens only (no padding); default: "
                                 "on for CPU replicas, off on GPUs until a GPU run has measured it")
    fused_rotary: bool = option(False, "rotate q and k in one torch.compile'd kernel (GPU; the first batch "
                                "pays the compile)")
    max_batch_size: int = option(64, "requests per forward pass")
    # 0: a batch is whatever queued while the previous one ran (continuous batching); a positive
    # wait only adds latency to an idle replica (bench/grpc.py: +5 ms at concurrency 1).
    batch_wait_timeout_s: float = option(0.0, "seconds a batch waits for more requests (0: what queued meanwhile)")
    max_batch_residues: int | None = option(None, "residues per forward pass, padding included unless packed (default by device: 2048 on "
                                            "CPU, 512 for a padded CPU engine, 65536 on GPU)")
    max_sequences_per_request: int = option(256, "sequences per call")
    max_residues_per_request: int = option(262144, "residues per call: Predict's sequences, Annotate's sequences "
                                           "x adapters, Embed's sequences")
    max_embed_values: int = option(64 * 2**20, "Embed per_residue floats per call (~256 MB of response)")
    request_timeout_s: float = option(60.0, "a call not answered by then gets DEADLINE_EXCEEDED")
    registry_poll_s: float = option(0.5, "seconds between scans of the registry folder")
    torch_threads: int | None = option(None, "torch threads of a replica (default: its CPUs; 0: every core)")
    auth_token_file: str | None = option(None, "the bearer token every call must send (re-read when it changes); "
                                         f"default ${TOKEN_FILE_ENV}, then ${TOKEN_ENV}")

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
        from serving.engine.config import check_quantize, torch_dtype
        torch_dtype(args.get("dtype", cls.dtype))  # refused here, before any replica starts
        check_quantize(args.get("quantize", cls.quantize), args.get("device", cls.device), args.get("dtype", cls.dtype))
        return cls(**args)
