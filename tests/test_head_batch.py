import random

import pytest
import torch

from bench.launches import Launches
from modeling.heads import PER_RESIDUE, REGRESSION, SEQUENCE_CLASS, HeadSpec, build_head, residues
from serving.engine.head_batch import run_heads


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_stacked_heads_equal_each_head_run_alone(dtype, tol):
    torch.manual_seed(0)
    specs = ([HeadSpec(PER_RESIDUE, 3, 24)] * 5 + [HeadSpec(PER_RESIDUE, 8, 24, hidden=16, kernel=5)] * 2
             + [HeadSpec(SEQUENCE_CLASS, 4, 24)] * 4 + [HeadSpec(REGRESSION, 1, 24)] * 3)
    heads = [build_head(spec).to(dtype).eval() for spec in specs]
    for head in heads:  # non-zero biases everywhere, so padding handling shows
        for p in head.parameters():
            p.data.normal_(0, 0.3)
    lengths = torch.tensor([5, 17, 9, 30, 1, 12, 22, 8])
    reps, mask = residues(torch.randn(len(lengths), 32, 24, dtype=dtype), lengths)
    rng = random.Random(1)
    rows = [rng.sample(range(len(lengths)), rng.randint(1, 4)) for _ in heads]  # rows shared across heads too
    got = run_heads(heads, rows, reps, mask)
    for head, index, out in zip(heads, rows, got):
        with torch.no_grad():
            want = head(reps[index], mask[index])
        assert out.shape == want.shape
        scale = want.float().abs().max().clamp(min=1)
        assert (out.float() - want.float()).abs().max() <= tol * scale
        assert out.view(-1).data_ptr() == out.data_ptr()  # flattening copies nothing


def test_the_number_of_kernels_does_not_grow_with_the_number_of_adapters():
    lengths = torch.tensor([7, 9, 4, 12] * 8)
    reps, mask = residues(torch.randn(len(lengths), 14, 16), lengths)
    counts = {}
    for kind in (PER_RESIDUE, SEQUENCE_CLASS):
        for adapters in (2, 32):
            heads = [build_head(HeadSpec(kind, 3, 16)).eval() for _ in range(adapters)]
            rows = [[j % len(lengths)] for j in range(adapters)]
            with Launches() as ops, torch.no_grad():
                run_heads(heads, rows, reps, mask)
            counts[kind, adapters] = ops.count
        assert counts[kind, 2] == counts[kind, 32]
