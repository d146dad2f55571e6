"""Encoder passes replayed from CUDA graphs (`EngineConfig.cuda_graphs`; CUDA only, off by default).

At the 650M shape on an H200 the eager passes were bound by the host, not the GPU (bench/results:
merged 385 ms of wall time for 300 ms of kernels, mixed-64 545 ms for 347 ms): the host queues
kernels slower than the device runs them, so the LoRA path's extra launches cost host time, not
device time. A graph queues a whole encoder pass with one call.

A graph has fixed shapes and addresses, so a batch is padded to a bucket (`bucket`: rows to a
multiple of 8, positions to a multiple of 64) before it is tokenised: padding rows are empty
sequences (<cls><eos>) with no adapter (slot 0) and padding positions are <pad>, which the attention
mask hides, so the real rows come out as in the unpadded batch (a test checks that on the CPU).
The bucket's graph is captured on first use and replayed after: the batch's tokens and slot indices
are copied into the graph's static inputs, and its output is copied out before the next replay can
overwrite it. All graphs share one memory pool: safe because replays never overlap (the engine runs
one forward at a time) and each graph keeps only its own inputs and output alive.
"""
from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from modeling.alphabet import tokenize
from modeling.cuda_graphs import capture
from serving.engine.multilora import SlotContext

ROW_STEP, POSITION_STEP = 8, 64


def bucket(rows: int, width: int) -> tuple[int, int]:
    """The padded (rows, token positions) a batch of `rows` x `width` tokens runs as."""
    return -(-rows // ROW_STEP) * ROW_STEP, -(-width // POSITION_STEP) * POSITION_STEP


def padded_batch(sequences: list[str], slots: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Tokens and slot indices of the batch padded to its bucket (see the module docstring)."""
    rows, width = bucket(len(sequences), max(map(len, sequences)) + 2)
    extra = rows - len(sequences)
    return tokenize(sequences + [""] * extra, pad_to=width), slots + [0] * extra


@dataclass
class _Graph:
    encoder: weakref.ref  # the graph is valid only for this module: an id alone may be reused
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # static inputs
    slots: torch.Tensor | None
    output: torch.Tensor


class EncoderGraphs:
    """One captured encoder pass per (encoder, bucket, LoRA or not, which layers add a bias), LRU."""

    def __init__(self, context: SlotContext, gather: Callable[[torch.Tensor], torch.Tensor], capacity: int = 32):
        self.context, self.gather, self.capacity = context, gather, capacity
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.captures, self.capture_s = 0, 0.0

    def run(self, encoder: nn.Module, tokens: torch.Tensor, slots: torch.Tensor | None, variant: tuple) -> torch.Tensor:
        """encoder(tokens) with the slots' adapters (None: the encoder alone), as a graph replay.
        tokens and slots: on the device, already padded to a bucket. `variant`: whatever else the
        captured pass depends on (the LoRA layers' Python-side flags)."""
        key = (id(encoder), tuple(tokens.shape), slots is not None, variant)
        entry = self.graphs.get(key)
        if entry is None or entry.encoder() is not encoder:
            entry = self._capture(encoder, tokens, slots)
            self.graphs[key] = entry
            while len(self.graphs) > self.capacity:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        entry.tokens.copy_(tokens)
        if slots is not None:
            entry.slots.copy_(slots)
        entry.graph.replay()
        return entry.output.clone()

    def _forward(self, encoder: nn.Module, tokens: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        return self.context.run(encoder, tokens, None if slots is None else self.gather(slots))

    def _capture(self, encoder: nn.Module, tokens: torch.Tensor, slots: torch.Tensor | None) -> _Graph:
        start = time.perf_counter()
        tokens = tokens.clone()
        slots = None if slots is None else slots.clone()
        graph, output = capture(lambda: self._forward(encoder, tokens, slots), tokens.device, warmup=2, pool=self.pool)
        self.captures += 1
        self.capture_s += time.perf_counter() - start
        return _Graph(weakref.ref(encoder), graph, tokens, slots, output)
