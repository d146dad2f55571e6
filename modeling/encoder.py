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

try:  # torch >= 2.10; the GPU machine's 2.11 and this pin's 2.13 take the same positional call
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: padded attention
    varlen_attn = None


@dataclass(frozen=True)
class EncoderShape:
    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


class Packing:
    """A padded batch's real tokens, packed (the THD layout of FlashAttention's varlen kernels):
    row b's tokens are the b-th segment of the packed (N, ...) tensors, token n sits at flat
    position index[n] = row * width + position of the padded (rows, width) grid. Linears, norms
    and GELU run on the N packed tokens; attention and the per-sequence LoRA terms run per segment
    (varlen attention on CUDA, a loop on CPU) or on the padded view (pad/unpad: one index copy)."""

    def __init__(self, tokens: torch.Tensor):
        real = tokens.ne(PAD)
        self.rows, self.width = tokens.shape
        self.real = real
        self.index = real.reshape(-1).nonzero().squeeze(1)  # (N,) row-major: segments in row order
        self.positions = self.index % self.width  # (N,) each token's position in its sequence
        lengths = real.sum(1)
        self.lengths: list[int] = lengths.tolist()
        self.cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (rows + 1,)

    @property
    def tokens(self) -> int:
        return len(self.index)

    def key_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(rows, 1, 1, width) additive attention mask for the padded view: the dtype's minimum on padding."""
        return (~self.real)[:, None, None, :].to(dtype) * torch.finfo(dtype).min

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (rows, width, ...), zeros where there is no token."""
        out = x.new_zeros(self.rows * self.width, *x.shape[1:])
        return out.index_copy_(0, self.index, x).view(self.rows, self.width, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, width, ...) -> (N, ...)."""
        return x.reshape(self.rows * self.width, *x.shape[2:]).index_select(0, self.index)

    def segments(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, ...) -> one view per row."""
        return x.split(self.lengths)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Attention within each sequence of packed (N, H, D) q, k, v -> (N, H, D), scale D**-0.5.
    CUDA in half precision: FlashAttention's varlen kernel (no padding at all); float32 on CUDA:
    the padded view; CPU: per segment (torch's CPU flash kernel per sequence beat the padded
    batch with a mask: bench.engine's packed_over_padded)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and varlen_attn is not None:
        longest = max(packing.lengths)
        return varlen_attn(q, k, v, packing.cu_seqlens, packing.cu_seqlens, longest, longest)
    return (padded_attention if q.is_cuda else segment_attention)(q, k, v, packing)


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    q, k, v = (packing.pad(t).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.key_mask(q.dtype))
    return packing.unpad(out.transpose(1, 2))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    heads_first = [t.transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, N, D): 4-D, or CPU takes the slow path
    return torch.cat([F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
                      for qs, ks, vs in zip(*(t.split(packing.lengths, dim=2) for t in heads_first))])


class EsmLayer(TransformerLayer):
    """fair-esm's pre-LayerNorm transformer layer on (B, T, E), attention fused."""

    fused_rotary = False  # EsmEncoder.fuse_rotary sets it

    def rotate_qk(self, q, k, cos, sin):
        return (fused_rotate_qk if self.fused_rotary else rotate_qk)(q, k, cos, sin)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """mask: (B, 1, 1, T), added to the attention scores: 0, or the dtype's minimum on padding keys.
        rotary: (cos, signed sin) from EsmEncoder.rotary_tables, float32."""
        x = x + self._attention(self.self_attn_layer_norm(x), mask, rotary)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))  # exact (erf) GELU, as fair-esm

    def forward_packed(self, x: torch.Tensor, packing: Packing, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The same layer on packed tokens x (N, E); rotary: per-token (cos, signed sin), (N, 1, D)."""
        x = x + self._attention_packed(self.self_attn_layer_norm(x), packing, rotary)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))

    def _attention_packed(self, x: torch.Tensor, packing: Packing, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        attn = self.self_attn
        heads = (x.shape[0], attn.num_heads, attn.head_dim)
        q, k = self.rotate_qk(attn.q_proj(x).view(heads), attn.k_proj(x).view(heads), *rotary)
        out = packed_attention(q, k, attn.v_proj(x).view(heads), packing)
        return attn.out_proj(out.reshape(x.shape))

    def _attention(self, x: torch.Tensor, mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        attn = self.self_attn
        batch, length, dim = x.shape
        heads = (batch, length, attn.num_heads, attn.head_dim)
        # Rotated in the projections' own (B, T, H, D) layout, then viewed as (B, H, T, D).
        q, k = (t.transpose(1, 2) for t in self.rotate_qk(attn.q_proj(x).view(heads), attn.k_proj(x).view(heads), *rotary))
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

    def forward(self, tokens: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """tokens (B, T) -> final representations (B, T, E); same maths as fair-esm ESM2.forward.
        With `packing` (Packing(tokens)) the layers run on the real tokens only; the answer is
        the same, padded again at the end (zeros at padding positions)."""
        padding_mask = tokens.eq(PAD)
        x = self.embed_tokens(tokens)
        if self.shape.token_dropout:
            is_mask = tokens.eq(MASK)
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            lengths = (~padding_mask).sum(-1)
            observed = is_mask.sum(-1).to(x.dtype) / lengths
            x = x * (1 - mask_ratio_train) / (1 - observed)[:, None, None]
        if packing is not None:
            return self._forward_packed(packing.unpad(x), packing)
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

    def _forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        cos, sin = self.rotary_tables(packing.width, x.device)
        rotary = cos.index_select(0, packing.positions), sin.index_select(0, packing.positions)
        for layer in self.layers:
            x = layer.forward_packed(x, packing, rotary)
        return packing.pad(self.emb_layer_norm_after(x))

    def fuse_rotary(self, on: bool = True) -> "EsmEncoder":
        """Rotate q and k in one compiled kernel (fused_rotate_qk): what the GPU profile asked for
        (the rotary was 30% of the 650M pass); on CPU Inductor's kernel measured slower than eager."""
        for layer in self.layers:
            layer.fused_rotary = on
        return self

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


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rotate(q, cos, sin), rotate(k, cos, sin)


_fused_rotate_qk = None


def fused_rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_qk compiled by torch.compile (Inductor): one generated kernel reads q, k and the
    float32 tables and writes both in their dtype, instead of eight (roll, mul, addcmul, cast per
    tensor). The same float32 arithmetic, so the same answers. Compiled once, for any length
    (dynamic shapes); no Triton kernel of our own is carried."""
    global _fused_rotate_qk
    if _fused_rotate_qk is None:
        _fused_rotate_qk = torch.compile(rotate_qk, dynamic=True, fullgraph=True)
    return _fused_rotate_qk(q, k, cos, sin)


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
