"""LoRA on the ESM-2 encoder with peft, BioNeMo's options, and export in PEFT's file format.

BioNeMo options mirrored: adapter_dim (rank), alpha, adapter_dropout, column/row init methods
(A and B), layer_selection, target_modules, weight_tying with position_embedding_strategy.
Weight tying shares one A/B pair per target module across the selected layers; the `add` strategy
adds a learned per-layer vector p_l to the adapter input, so tied layers can still differ.
On export, B·A·p_l is a constant per layer and is stored as PEFT's `lora_B.bias` (lora_bias=true),
so peft itself reproduces the adapter exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from modeling.targets import ALL_TARGETS, ATTENTION_TARGETS, PEFT_PREFIX, TARGET_ALIASES  # noqa: F401

INIT_METHODS = ("xavier", "zero", "normal", "kaiming")
POSITION_STRATEGIES = (None, "none", "add")


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: float | None = None  # None = rank (scale 1), as in BioNeMo
    dropout: float = 0.0
    init_a: str = "xavier"  # BioNeMo column_init_method
    init_b: str = "zero"  # BioNeMo row_init_method
    layers: list[int] | None = None  # None = every layer (BioNeMo layer_selection)
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    tie: bool = False
    position_embedding: str | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        for name, method in (("init_a", self.init_a), ("init_b", self.init_b)):
            if method not in INIT_METHODS:
                raise ValueError(f"{name}={method!r}: expected one of {INIT_METHODS}")
        if self.position_embedding not in POSITION_STRATEGIES:
            raise ValueError(f"position_embedding_strategy={self.position_embedding!r}: "
                             f"expected one of none, add")
        if self.position_embedding == "none":
            self.position_embedding = None
        if self.position_embedding and not self.tie:
            raise ValueError("position_embedding_strategy needs weight_tying=true")
        targets: list[str] = []
        for t in self.targets:
            for name in TARGET_ALIASES.get(t, (t,)):
                if name not in ALL_TARGETS:
                    raise ValueError(f"target module {t!r}: expected some of {ALL_TARGETS} "
                                     f"or {sorted(TARGET_ALIASES)}")
                if name not in targets:
                    targets.append(name)
        self.targets = targets

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict:
        return asdict(self)


def _init(weight: torch.Tensor, method: str) -> None:
    if method == "zero":
        nn.init.zeros_(weight)
    elif method == "xavier":
        nn.init.xavier_normal_(weight)
    elif method == "normal":
        nn.init.normal_(weight, std=0.02)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def lora_modules(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def peft_config(spec: LoraSpec, num_layers: int, lora_bias: bool = False) -> LoraConfig:
    """PEFT's own config for `spec` (what adapter_config.json holds, via .to_dict())."""
    layers = None if spec.layers is None else sorted(spec.layers)
    if layers is not None and any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f"layer_selection {layers}: the base has layers 0..{num_layers - 1}")
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.targets), layers_to_transform=layers,
                      layers_pattern="layers" if layers is not None else None,
                      lora_bias=lora_bias, bias="none")


def adapter_config(spec: LoraSpec, num_layers: int, lora_bias: bool = False) -> dict:
    """adapter_config.json: PEFT's config as JSON (its sets as sorted lists)."""
    config = peft_config(spec, num_layers, lora_bias).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def add_lora(encoder: nn.Module, spec: LoraSpec, num_layers: int) -> nn.Module:
    """Inject trainable LoRA into `encoder` in place; everything else is frozen."""
    inject_adapter_in_model(peft_config(spec, num_layers), encoder)
    for param in encoder.parameters():
        param.requires_grad_(False)
    modules = lora_modules(encoder)
    first: dict[str, LoraLayer] = {}
    for name, m in modules.items():
        target = name.rsplit(".", 1)[-1]
        lora_a, lora_b = m.lora_A["default"], m.lora_B["default"]
        if spec.tie and target in first:
            lora_a.weight = first[target].lora_A["default"].weight
            lora_b.weight = first[target].lora_B["default"].weight
        else:
            _init(lora_a.weight.data, spec.init_a)
            _init(lora_b.weight.data, spec.init_b)
            first.setdefault(target, m)
        lora_a.weight.requires_grad_(True)
        lora_b.weight.requires_grad_(True)
        # peft casts each adapter's input to the adapter's float32; under mixed precision out_proj
        # and fc2 get bfloat16 inputs, which autocast casts straight back for the matmul: two copies
        # of the activations per layer, forward and backward, for the same numbers (tests/test_lora.py;
        # with dropout, masks drawn in bfloat16). Without autocast the dtypes agree (32-true, bf16-true).
        m.cast_input_dtype_enabled = False
        if spec.position_embedding == "add":
            m.lora_position = nn.Parameter(torch.zeros(lora_a.in_features))
            lora_a.register_forward_pre_hook(_add_position(m))
    return encoder


def _add_position(layer: LoraLayer):
    def hook(_module, args):
        return (args[0] + layer.lora_position,) + tuple(args[1:])
    return hook


def export_adapter(encoder: nn.Module, spec: LoraSpec, num_layers: int) -> tuple[dict, dict]:
    """(adapter_config.json dict, adapter_model.safetensors tensors) in PEFT's own format."""
    add = spec.position_embedding == "add"
    config = adapter_config(spec, num_layers, lora_bias=add)
    tensors = {}
    for name, m in lora_modules(encoder).items():
        a = m.lora_A["default"].weight.detach()
        b = m.lora_B["default"].weight.detach()
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.clone().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.clone().contiguous()
        if add:
            tensors[f"{PEFT_PREFIX}{name}.lora_B.bias"] = (b @ (a @ m.lora_position.detach())).contiguous()
    return config, tensors


def export_positions(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The raw per-layer vectors of the `add` strategy, kept so training can resume from a bundle."""
    return {f"{name}.lora_position": m.lora_position.detach().clone()
            for name, m in lora_modules(encoder).items() if hasattr(m, "lora_position")}


def load_adapter_weights(encoder: nn.Module, tensors: dict[str, torch.Tensor],
                         positions: dict[str, torch.Tensor] | None = None) -> None:
    """Copy PEFT-format A/B weights (and `add` vectors) into an encoder prepared with add_lora."""
    modules = lora_modules(encoder)
    for name, m in modules.items():
        for part in ("lora_A", "lora_B"):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            if key not in tensors:
                raise ValueError(f"adapter has no {key}; its targets/layers differ from this config")
            getattr(m, part)["default"].weight.data.copy_(tensors[key])
        if positions and hasattr(m, "lora_position"):
            m.lora_position.data.copy_(positions[f"{name}.lora_position"])


def expected_trainable(spec: LoraSpec, shape_in_out: dict[str, tuple[int, int]], num_layers: int) -> int:
    """The LoRA parameter count the formula gives (what tests hold the injection to)."""
    layers = num_layers if spec.layers is None else len(set(spec.layers))
    per_layer = sum(spec.rank * (shape_in_out[t][0] + shape_in_out[t][1]) for t in spec.targets)
    if not spec.tie:
        return layers * per_layer
    positions = layers * sum(shape_in_out[t][0] for t in spec.targets) if spec.position_embedding else 0
    return per_layer + positions
