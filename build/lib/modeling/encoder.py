"""The one internal ESM-2 encoder class, whatever checkpoint format the weights came from.

Built from fair-esm's own TransformerLayer (its parameters, names and rotary tables), so LoRA targets
are always named `layers.{i}.self_attn.{q_proj,k_proj,v_proj,out_proj}` and `layers.{i}.{fc1,fc2}`.
The layer's forward is our own, batch-first, with torch's fused scaled-dot-product attention: the
same maths as fair-esm's (tests compare the two), about twice as fast on CPU: fair-esm's attention
materialises the whole score matrix in separate steps and averages it into weights nobody here reads.
The language-model and contact heads are dropped: tasks only need the final representations.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
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


class EsmLayer(TransformerLayer):
    """fair-esm's pre-LayerNorm transformer layer on (B, T, E), attention fused."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """mask: (B, 1, 1, T), added to the attention scores: 0, or the dtype's minimum on padding keys.
        rotary: (cos, signed sin) from EsmEncoder.rotary_tables, float32."""
        x = x + self._attention(self.self_attn_layer_norm(x), mask, rotary)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))  # exact (erf) GELU, as fair-esm

    def _attention(self, x: torch.Tensor, mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        attn = self.self_attn
        batch, length, dim = x.shape
        heads = (batch, length, attn.num_heads, attn.head_dim)
        # Rotated in the projections' own (B, T, H, D) layout, then viewed as (B, H, T, D).
        q = rotate(attn.q_proj(x).view(heads), *rotary).transpose(1, 2)
        k = rotate(attn.k_proj(x).view(heads), *rotary).transpose(1, 2)
        v = attn.v_proj(x).view(heads).transpose(1, 2)
        if mask.dtype != q.dtype:  # under autocast: fused CUDA kernels take a mask of q's dtype only
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale head_dim**-0.5, as fair-esm
        return attn.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class EsmEncoder(nn.Module):
    def __init__(self, shape: EncoderShape):
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(len(TOKENS), shape.embed_dim, padding_idx=PAD)
        self.layers = nn.ModuleList(
            EsmLayer(shape.embed_dim, 4 * shape.embed_dim, shape.attention_heads,
                     add_bias_kv=False, use_esm1b_layer_norm=True, use_rotary_embeddings=True)
            for _ in range(shape.num_layers))
        self.emb_layer_norm_after = ESM1bLayerNorm(shape.embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.shape.embed_dim

    def _apply(self, fn, recurse=True):
        """Casts (`.to(bfloat16)`, `.half()`) leave the rotary frequencies in float32: in bfloat16
        positions above 256 are not integers and the angles drift (measured on the 8M base: 2.6x
        the bf16 error over residues 400-500)."""
        super()._apply(fn, recurse)
        for layer in self.layers:
            rot = layer.self_attn.rot_emb
            if rot.inv_freq.dtype != torch.float32:
                dim = 2 * rot.inv_freq.numel()
                exponent = torch.arange(0, dim, 2, device=rot.inv_freq.device, dtype=torch.float32) / dim
                rot.inv_freq = 1.0 / (10000 ** exponent)
        reset_rotary_caches(self)
        return self

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
        # Always pass the mask (fair-esm drops an all-False one; that branch breaks ONNX tracing).
        # Additive, finite: a boolean mask exports to ONNX as Where + IsNaN guards over every score.
        mask = padding_mask[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        # float32 tables: the rotation runs in float32 whatever q and k are (fair-esm's maths); as
        # bfloat16 tables they moved bfloat16 answers up to 0.0123 from float32's at 8M on an H200,
        # past the stated 0.01 (bench/results run 3; run 4, rotating in float32: 0.0029).
        rotary = self.rotary_tables(tokens.shape[1], tokens.device)
        for layer in self.layers:
            x = layer(x, mask, rotary)
        return self.emb_layer_norm_after(x)

    def rotary_tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fair-esm's rotary cos and sin for positions 0..length-1, (T, 1, D) in float32, computed
        once per forward for every layer (they share the frequencies), the first half of sin negated
        for `rotate`. fair-esm's per-layer tables cost each layer ~8 kernels whenever the length
        changes, its rotation 5 kernels a tensor (bench/results: ~30% of the device time at 650M)."""
        inv_freq = self.layers[0].self_attn.rot_emb.inv_freq
        freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """fair-esm's apply_rotary_pos_emb, x * cos + rotate_half(x) * sin, computed in float32 (the
    tables' type) and returned in x's: rolling the halves swaps them and the signed sin supplies
    rotate_half's minus (three kernels, and a cast when x is not float32)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)


def reset_rotary_caches(model: nn.Module) -> None:
    """fair-esm's rotary tables are cached by length and device only: after a cast they would keep
    the old dtype, and under ONNX tracing they would be frozen into the graph."""
    for module in model.modules():
        if hasattr(module, "_seq_len_cached"):
            module._seq_len_cached = None


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


def stock_fair_esm(encoder: EsmEncoder) -> nn.Module:
    """fair-esm's own ESM2 class holding `encoder`'s weights (its unused LM head left random):
    the reference our layers are tested against, and the model a user of fair-esm would write."""
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    shape = encoder.shape
    model = ESM2(shape.num_layers, shape.embed_dim, shape.attention_heads,
                 alphabet=Alphabet.from_architecture("ESM-1b"), token_dropout=shape.token_dropout)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("lm_head", "contact_head")) for k in missing), missing
    return model.eval()
