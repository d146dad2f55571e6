"""Task heads on top of the shared encoder: per-residue conv, pooled classifier/regressor."""
from __future__ import annotations

import torch
from torch import nn

from modeling.kinds import KINDS, PER_RESIDUE, REGRESSION, SEQUENCE_CLASS, HeadSpec  # noqa: F401


def residues(representations: torch.Tensor, lengths: torch.Tensor,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, E) token representations -> residue part (B, L, E) with padding zeroed, and its mask.

    Zeroing padding makes every head's output for a sequence independent of what it is batched with.
    `width`: the longest length, when the caller knows it (reading it from a GPU tensor makes the
    host wait for the encoder before it can queue the heads).
    """
    width = int(lengths.max()) if width is None else width
    reps = representations[:, 1:width + 1]
    mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    return reps * mask.unsqueeze(-1).to(reps.dtype), mask


class ConvHead(nn.Module):
    def __init__(self, spec: HeadSpec):
        super().__init__()
        pad = spec.kernel // 2
        self.net = nn.Sequential(
            nn.Conv1d(spec.embed_dim, spec.hidden, spec.kernel, padding=pad), nn.ReLU(),
            nn.Dropout(spec.dropout), nn.Conv1d(spec.hidden, spec.num_outputs, spec.kernel, padding=pad))

    def forward(self, reps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        conv1, relu, dropout, conv2 = self.net
        keep = mask.unsqueeze(1).to(reps.dtype)
        # Re-zero padding between the convolutions (conv1's bias makes it non-zero), so a
        # sequence's output never depends on the sequences it is batched with.
        hidden = dropout(relu(conv1(reps.transpose(1, 2))) * keep)
        return conv2(hidden).transpose(1, 2)  # (B, L, C)


class PooledHead(nn.Module):
    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(spec.embed_dim, spec.hidden), nn.ReLU(), nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden, spec.num_outputs))

    def forward(self, reps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(reps.dtype)
        pooled = (reps * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.net(pooled)  # (B, C)


def build_head(spec: HeadSpec) -> nn.Module:
    return ConvHead(spec) if spec.kind == PER_RESIDUE else PooledHead(spec)
