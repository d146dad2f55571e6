"""Names of the LoRA target modules (light: no torch, no peft), shared by training, serving and the CLIs."""
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ALL_TARGETS = ATTENTION_TARGETS + ("fc1", "fc2")
# BioNeMo / NeMo names for the same projections.
TARGET_ALIASES = {"attention_qkv": ("q_proj", "k_proj", "v_proj"), "attention_dense": ("out_proj",),
                  "mlp_fc1": ("fc1",), "mlp_fc2": ("fc2",), "query": ("q_proj",), "key": ("k_proj",),
                  "value": ("v_proj",)}
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors
