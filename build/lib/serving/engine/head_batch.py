"""Many adapters' heads in a few kernels: heads of one shape are stacked and run as one.

After the shared encoder, a batch of 64 adapters used to run 64 head calls of ~12 small kernels
each; on a GPU those launches, not the arithmetic, were the cost (bench/results: 7,600 extra
launches per pass at 650M). Here heads with the same architecture and sizes form one group per
batch: their weights are stacked and gathered per row, the pooled heads run as batched matmuls and
the convolution heads as one grouped convolution (each row its own group), so the launch count
depends on the number of head shapes in a batch, not on the number of adapters.
Eval only: dropout is skipped, as it is in eval mode.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from modeling.heads import ConvHead, PooledHead
from serving.engine.transfer import to_device


# Per head, worked out once: heads do not change once loaded, and walking their modules every batch
# (a shape key and four parameter lookups per head) cost 17 ms of host time per batch of 64 heads
# on this 2-core machine (3.5 ms with this, the stacking included).
_ABOUT: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, torch.Tensor]]]" = weakref.WeakKeyDictionary()


def about(head: nn.Module) -> tuple[tuple, dict[str, torch.Tensor]]:
    """(shape key, parameters by name) of a head: heads with equal keys can be stacked."""
    known = _ABOUT.get(head)
    if known is None:
        params = dict(head.named_parameters())
        key = (type(head).__name__,) + tuple((name, tuple(p.shape), p.dtype) for name, p in params.items())
        known = _ABOUT[head] = (key, params)
    return known


def run_heads(heads: list[nn.Module], rows: list[list[int]], reps: torch.Tensor,
              mask: torch.Tensor) -> list[torch.Tensor]:
    """heads[j] applied to reps[rows[j]] (with mask[rows[j]]); returns one output per head, as
    head(reps[rows[j]], mask[rows[j]]) would. `rows` index the batch's encoder rows. The outputs
    are contiguous views of one tensor per group: flattening them copies nothing."""
    outputs: list[torch.Tensor | None] = [None] * len(heads)
    groups: dict[tuple, list[int]] = {}
    for j, head in enumerate(heads):
        groups.setdefault(about(head)[0], []).append(j)
    for members in groups.values():
        # All the group's row indices and each row's head, built on the host, sent in one copy.
        flat = [r for j in members for r in rows[j]]
        owner = [k for k, j in enumerate(members) for _ in rows[j]]
        index = to_device(torch.tensor(flat + owner), reps.device)
        row_index, head_index = index[:len(flat)], index[len(flat):]
        group = [heads[j] for j in members]
        if isinstance(group[0], ConvHead):
            out = _conv_heads(group, head_index, reps[row_index], mask[row_index])
        elif isinstance(group[0], PooledHead):
            out = _pooled_heads(group, head_index, reps[row_index], mask[row_index])
        else:
            raise TypeError(f"no batched form for head {type(group[0]).__name__}")
        for piece, j in zip(out.split([len(rows[j]) for j in members]), members):
            outputs[j] = piece
    return outputs  # type: ignore[return-value]


def _stacked(group: list[nn.Module], name: str, head_index: torch.Tensor) -> torch.Tensor:
    """Parameter `name` of every head in the group, one per row."""
    return torch.stack([about(head)[1][name] for head in group])[head_index]


def _pooled_heads(group: list[PooledHead], head_index: torch.Tensor, reps: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(reps.dtype)
    pooled = (reps * weights).sum(1) / weights.sum(1).clamp(min=1)  # (n, E), as PooledHead
    w1, b1 = _stacked(group, "net.0.weight", head_index), _stacked(group, "net.0.bias", head_index)
    w2, b2 = _stacked(group, "net.3.weight", head_index), _stacked(group, "net.3.bias", head_index)
    hidden = torch.baddbmm(b1.unsqueeze(1), pooled.unsqueeze(1), w1.transpose(1, 2)).relu()
    return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2)).squeeze(1)  # (n, C)


def _conv_heads(group: list[ConvHead], head_index: torch.Tensor, reps: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    n, length, _ = reps.shape
    conv1, conv2 = group[0].net[0], group[0].net[3]
    w1, b1 = _stacked(group, "net.0.weight", head_index), _stacked(group, "net.0.bias", head_index)
    w2, b2 = _stacked(group, "net.3.weight", head_index), _stacked(group, "net.3.bias", head_index)
    # Rows side by side as channel groups: (1, n*E, L) with groups=n is n independent convolutions.
    x = reps.transpose(1, 2).reshape(1, -1, length)
    hidden = F.conv1d(x, w1.flatten(0, 1), b1.flatten(), padding=conv1.padding, groups=n).relu()
    hidden = hidden.view(n, -1, length) * mask.unsqueeze(1).to(reps.dtype)  # re-zero padding, as ConvHead
    out = F.conv1d(hidden.view(1, -1, length), w2.flatten(0, 1), b2.flatten(), padding=conv2.padding, groups=n)
    return out.view(n, conv2.out_channels, length).transpose(1, 2).contiguous()  # (n, L, C)
