"""Batched multi-LoRA linear layers (Punica's BGMV idea in plain torch) over one packed slot store.

Each targeted nn.Linear of the shared base is wrapped; the wrapper reads its part of each sequence's
adapter from a shared `SlotContext` (the batch's slots, gathered once per batch) and computes
y = base(x) + (x A^T) Bt (+ bias) as two batched matmuls, so the number of kernel launches per
layer is the same whether a batch holds 1 or 64 distinct adapters. Inputs are batch-first (B, T, d_in).

Every layer's slots live in one tensor, `SlotStore.slab` (slots, slot size); slot 0 stays all zeros
(no adapter). A slot is laid out so that an adapter of rank r fills a prefix of it:
  [ bias of every layer | rank row 0 of every layer's A and Bt | rank row 1 ... | up to r_max ]
so loading an adapter is one host -> device copy of its packed form plus one fill of zeros, whatever
its rank and however many layers it targets (it was 264 copies and ~800 small kernels per adapter at
650M, bench/results). B is stored transposed (Bt, r x d_out) and pre-multiplied by the LoRA scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class SlotContext:
    """The adapter weights of the batch being run: its sequences' slots gathered from the store, one
    row per sequence (None = base only). One gather per batch serves every layer: gathering per
    layer copied the same bytes in 264 launches per batch at 650M."""

    def __init__(self):
        self.rows: torch.Tensor | None = None
        self.packing = None  # modeling.encoder.Packing while a packed batch runs

    def run(self, module: nn.Module, tokens: torch.Tensor, rows: torch.Tensor | None, packing=None) -> torch.Tensor:
        """module(tokens) with `rows` (gathered slots; None: no adapter) as the batch's adapters;
        with `packing` the module runs on the packed tokens (modeling/encoder.py)."""
        self.rows, self.packing = rows, packing
        try:
            return module(tokens, packing) if packing is not None else module(tokens)
        finally:
            self.rows, self.packing = None, None


@dataclass(frozen=True)
class PackedLora:
    """One adapter in slot layout, cut after its own rank: what the CPU tier keeps."""
    data: torch.Tensor  # 1-D: bias part, then `rank` rows
    rank: int
    bias_paths: frozenset[str]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, context: SlotContext, store: "SlotStore", path: str):
        super().__init__()
        self.base = base
        self.context, self.store, self.path = context, store, path
        self.use_bias = False  # set once an adapter with a bias here is loaded: others add zeros

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the wrapped linear, whatever form its weight takes (float or int8)."""
        return self.store.shapes[self.path]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.context.rows
        if rows is None:
            return y
        a, bt, bias = self.store.views(self.path, rows)  # (B, r, in), (B, r, out), (B, out)
        if x.dim() == 2:  # packed tokens (N, in), sequence b the b-th segment
            return self._packed(x, y, a, bt, bias)
        h = torch.bmm(x, a.transpose(1, 2))  # (B, T, r)
        if self.use_bias:
            y += bias.unsqueeze(1)
        # Added into y by the matmul itself: a separate delta and sum cost two more passes over the
        # activations, more than the base matmul at 650M (bench/results, H200 profile).
        return y.baddbmm_(h, bt)

    def _packed(self, x, y, a, bt, bias) -> torch.Tensor:
        """The LoRA terms of packed tokens: on CUDA one batched matmul over the padded view (no
        SGMV kernel is carried); on CPU per segment (1.9x faster than the padded bmm at 8 rows of
        60-480 tokens, rank 16)."""
        lora = lora_padded if x.is_cuda else lora_segments
        return lora(x, y, a, bt, bias if self.use_bias else None, self.context.packing)


def lora_padded(x, y, a, bt, bias, packing) -> torch.Tensor:
    """y + x_b A_b^T B_b^T (+ bias_b) for packed x (N, in), y (N, out); a (B, r, in), bt (B, r, out)."""
    h = torch.bmm(packing.pad(x), a.transpose(1, 2))  # (B, T, r)
    delta = torch.bmm(h, bt) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, bt)
    return y + packing.unpad(delta)


def lora_segments(x, y, a, bt, bias, packing) -> torch.Tensor:
    """The same, a segment at a time, added into y's views."""
    for b, (xs, ys) in enumerate(zip(packing.segments(x), packing.segments(y))):
        ys.addmm_(xs @ a[b].T, bt[b])
        if bias is not None:
            ys += bias[b]
    return y


class SlotStore:
    """The device slots of every wrapped linear, in one tensor (layout in the module docstring)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], num_slots: int, r_max: int,
                 device: torch.device, dtype: torch.dtype):
        self.r_max = r_max
        self.shapes = shapes  # path -> (d_out, d_in)
        self.columns: dict[str, tuple[int, int, int]] = {}  # path -> (A offset, Bt offset, bias offset)
        row, bias = 0, 0
        for path, (d_out, d_in) in shapes.items():
            self.columns[path] = (row, row + d_in, bias)
            row, bias = row + d_in + d_out, bias + d_out
        self.row_width, self.bias_width = row, bias
        self.slab = torch.zeros(num_slots, bias + r_max * row, device=device, dtype=dtype)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The slots' rows of the slab, one per sequence: what a batch's SlotContext holds."""
        return self.slab.index_select(0, slots)

    def views(self, path: str, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's part of each row of `table` (the slab or gathered rows, (N, slot size)):
        A (N, r_max, in), Bt (N, r_max, out), bias (N, out); views, nothing copied."""
        (a_at, bt_at, bias_at), (d_out, d_in) = self.columns[path], self.shapes[path]
        rows = table[:, self.bias_width:].view(len(table), self.r_max, self.row_width)
        return rows[:, :, a_at:a_at + d_in], rows[:, :, bt_at:bt_at + d_out], table[:, bias_at:bias_at + d_out]

    @property
    def slot_bytes(self) -> int:
        return self.slab[0].numel() * self.slab.element_size()

    def pack(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], scale: float,
             pin: bool = False) -> PackedLora:
        """layers: path -> (A (r, in), B (out, r), bias (out) or None), as in the bundle; the scale is
        folded in here, in float32, before the cast to the slots' dtype."""
        rank = max(a.shape[0] for a, _, _ in layers.values())
        data = torch.empty(self.bias_width + rank * self.row_width, dtype=self.slab.dtype, pin_memory=pin)
        # The rows assembled by one cat in float32 and cast once: per-layer writes into the packed
        # tensor cost a few hundred small operations (~16 ms of a 650M load on a 2-core host).
        pieces, biases = [], []
        for path, (d_out, d_in) in self.shapes.items():
            a, b, bias = layers.get(path, (None, None, None))
            if a is None:
                pieces.append(torch.zeros(rank, d_in + d_out))
            else:
                bt = b.float().t() * scale if scale != 1 else b.float().t()
                if a.shape[0] < rank:  # a lower rank in this layer: zero rows after its own
                    a, bt = (torch.cat([t.float(), t.new_zeros(rank - t.shape[0], t.shape[1])]) for t in (a, bt))
                pieces += [a.float(), bt]
            biases.append(bias.float() * scale if bias is not None else torch.zeros(d_out))
        data[:self.bias_width].copy_(torch.cat(biases))
        data[self.bias_width:].view(rank, self.row_width).copy_(torch.cat(pieces, dim=1))
        return PackedLora(data, rank, frozenset(p for p, (_, _, bias) in layers.items() if bias is not None))

    def unpack(self, packed: PackedLora) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """path -> (A (r, in), scaled B (out, r), scaled bias or None) in float32: what merging adds."""
        rows = packed.data[self.bias_width:].view(packed.rank, self.row_width).float()
        layers = {}
        for path, (a_at, bt_at, bias_at) in self.columns.items():
            d_out, d_in = self.shapes[path]
            a, bt = rows[:, a_at:a_at + d_in], rows[:, bt_at:bt_at + d_out]
            bias = packed.data[bias_at:bias_at + d_out].float() if path in packed.bias_paths else None
            if bias is not None or a.any():
                layers[path] = (a, bt.t(), bias)
        return layers

    def load(self, slot: int, packed: PackedLora) -> None:
        """One copy of the adapter's prefix, zeros after it (a lower rank than the slot's last one)."""
        size = packed.data.numel()
        self.slab[slot, :size].copy_(packed.data, non_blocking=True)
        self.slab[slot, size:].zero_()


def wrap_targets(encoder: nn.Module, targets: tuple[str, ...], num_slots: int, r_max: int,
                 context: SlotContext) -> tuple[dict[str, MultiLoraLinear], SlotStore]:
    """Replace every targeted Linear of `encoder` in place; returns ({module path: wrapper}, store)."""
    found = {}
    for name, module in list(encoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                found[f"{name}.{child_name}" if name else child_name] = (module, child_name, child)
    if not found:
        raise ValueError(f"no Linear layer named any of {list(targets)} in the encoder")
    weight = next(iter(found.values()))[2].weight
    store = SlotStore({path: tuple(child.weight.shape) for path, (_, _, child) in found.items()},
                      num_slots, r_max, weight.device, weight.dtype)
    wrapped = {}
    for path, (module, child_name, child) in found.items():
        wrapper = MultiLoraLinear(child, context, store, path)
        setattr(module, child_name, wrapper)
        wrapped[path] = wrapper
    return wrapped, store
