"""The one internal ESM-2 encoder class, whatever checkpoint format the weights came from.

Built from fair-esm's own TransformerLayer, so LoRA targets are always named
`layers.{i}.self_attn.{q_proj,k_proj,v_proj,out_proj}` and `layers.{i}.{fc1,fc2}`.
The language-model and contact heads are dropped: tasks only need the final representations.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch
from esm.modules import ESM1bLayerNorm, TransformerLayer
from torch import nn

from modeling.alphabet import MASK, PAD, TOKENS


@dataclass(frozen=True)
class EncoderShape:
    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


class EsmEncoder(nn.Module):
    def __init__(self, shape: EncoderShape):
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(len(TOKENS), shape.embed_dim, padding_idx=PAD)
        self.layers = nn.ModuleList(
            TransformerLayer(shape.embed_dim, 4 * shape.embed_dim, shape.attention_heads,
                             add_bias_kv=False, use_esm1b_layer_norm=True, use_rotary_embeddings=True)
            for _ in range(shape.num_layers))
        self.emb_layer_norm_after = ESM1bLayerNorm(shape.embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.shape.embed_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> final representations (B, T, E); same maths as fair-esm ESM2.forward."""
        padding_mask = tokens.eq(PAD)
        x = self.embed_tokens(tokens)
        if self.shape.token_dropout:
            is_mask = tokens.eq(MASK)
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            lengths = (~padding_mask).sum(-1)
            observed = is_mask.sum(-1).to(x.dtype) / lengths
            x = x * (1 - mask_ratio_train) / (1 - observed)[:, None, None]
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)  # fair-esm layers are time-first: (T, B, E)
        # Always pass the mask (fair-esm drops an all-False one; that branch breaks ONNX tracing).
        for layer in self.layers:
            x, _ = layer(x, self_attn_padding_mask=padding_mask)
        x = self.emb_layer_norm_after(x)
        return x.transpose(0, 1)


def fingerprint(encoder: EsmEncoder) -> str:
    """sha256 over parameter names, shapes and float32 values: the same weights give the same
    fingerprint whichever file format they were loaded from."""
    digest = hashlib.sha256()
    for name, param in sorted(encoder.named_parameters()):
        if ".lora_" in name or name.startswith("base_model"):
            raise ValueError("fingerprint the bare base encoder, not a LoRA-wrapped one")
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
