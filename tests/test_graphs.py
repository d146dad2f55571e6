"""The CPU half of serving/engine/graphs.py: the padding a CUDA graph's bucket adds changes no real row, and
the engine around the graphs (buckets, static inputs, LRU, merged copies) answers as the eager one
with a stand-in graph that re-runs its pass, and no operation in the captured pass makes the host
wait for the device (which fails a capture). Real capture and replay need a GPU: bench.gpu_check's
serving_graphed part checks them there against the eager engine."""
import pytest
import torch

from conftest import random_sequences
from modeling.alphabet import CLS, EOS, PAD, tokenize
from modeling.base import load_base
from modeling.cuda_graphs import HostSyncs
from modeling.lora import ATTENTION_TARGETS
from serving.engine import Engine, EngineConfig
from serving.engine.graphs import bucket, padded_batch
from serving.engine.multilora import SlotContext, wrap_targets


def test_buckets_round_rows_to_8_and_positions_to_64():
    assert bucket(1, 3) == (8, 64)
    assert bucket(8, 64) == (8, 64)
    assert bucket(9, 65) == (16, 128)
    assert bucket(64, 1024) == (64, 1024)  # the longest sequence, 1022 residues, needs no more


def test_padding_to_a_bucket_leaves_every_real_row_unchanged(tiny_base_dir):
    encoder = load_base(str(tiny_base_dir)).encoder.eval()
    context = SlotContext()
    layers, store = wrap_targets(encoder, ATTENTION_TARGETS, num_slots=3, r_max=8, context=context)
    g = torch.Generator().manual_seed(0)
    for slot, rank in ((1, 8), (2, 3)):  # two adapters with biases, so padding rows see every term
        store.load(slot, store.pack({path: (torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g),
                                             torch.randn(d_out, generator=g)) for path, (d_out, d_in) in store.shapes.items()},
                                    scale=0.5))
    for layer in layers.values():
        layer.use_bias = True
    sequences = random_sequences(5, 10, 70, seed=3)
    slots = [1, 2, 0, 2, 1]
    tokens, padded_slots = padded_batch(sequences, slots)
    assert tuple(tokens.shape) == bucket(5, max(map(len, sequences)) + 2) == (8, 128)
    assert padded_slots == slots + [0, 0, 0]
    assert tokens[5:, :2].tolist() == [[CLS, EOS]] * 3 and bool((tokens[5:, 2:] == PAD).all())
    with torch.no_grad():
        expected = context.run(encoder, tokenize(sequences), store.gather(torch.tensor(slots)))
        got = context.run(encoder, tokens, store.gather(torch.tensor(padded_slots)))
    assert torch.isfinite(got).all()  # padding rows too: an all-<pad> row would divide by zero
    for row, sequence in enumerate(sequences):  # <cls>, residues, <eos>; positions after are undefined
        torch.testing.assert_close(got[row, :len(sequence) + 2], expected[row, :len(sequence) + 2],
                                   atol=1e-5, rtol=1e-5)


def test_cuda_graphs_without_a_gpu_is_a_clear_error(tiny_base_dir, tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Engine(load_base(str(tiny_base_dir)), tmp_path, EngineConfig(cuda_graphs=True))


class ReplayByRerun:
    """Stands in for torch.cuda.CUDAGraph on a CPU: replay re-runs the captured pass on the static
    inputs into the static output (which capture leaves poisoned with NaN, so a replay that does not
    write it shows). It checks everything around the graph: buckets, static inputs, LRU, merged copies."""

    def replay(self):
        self.output.copy_(self.rerun())


def test_engine_replays_answer_as_the_eager_engine(tiny_base_dir, tmp_path, monkeypatch):
    import contextlib

    from bundles import make_bundle
    from serving.engine import graphs

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    for name, value in {"graph_pool_handle": lambda: None, "CUDAGraph": ReplayByRerun, "Stream": Stream,
                        "graph": lambda *args, **kwargs: contextlib.nullcontext(),
                        "current_stream": lambda *args: Stream(), "stream": lambda s: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    capture = graphs.EncoderGraphs._capture

    waits = []

    def capture_for_rerun(self, encoder, tokens, slots):
        with HostSyncs() as syncs:  # on a GPU a wait inside the captured pass makes capture fail
            entry = capture(self, encoder, tokens, slots)
        waits.extend(syncs.found)
        entry.graph.rerun = lambda: self._forward(encoder, entry.tokens, entry.slots)
        entry.graph.output = entry.output.fill_(float("nan"))
        return entry

    monkeypatch.setattr(graphs.EncoderGraphs, "_capture", capture_for_rerun)
    base, registry = load_base(str(tiny_base_dir)), tmp_path / "adapters"
    names = [f"a{i}" for i in range(6)]
    for i, name in enumerate(names):
        make_bundle(base, registry, name, rank=(2, 4, 8)[i % 3], seed=i)
    requests = [(names[i % 6], s, True) for i, s in enumerate(random_sequences(40, 5, 90, seed=1))]
    expected = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8)).predict(requests)
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8, max_batch_size=16))
    engine.graphs = graphs.EncoderGraphs(engine.context, engine.slot_store.gather, capacity=3)
    runs = [engine.predict(requests), engine.predict(requests)]
    engine.merge(names[0])  # its own encoder: graphs of its own
    runs.append(engine.predict(requests))
    assert engine.graphs.captures > 3 and len(engine.graphs.graphs) == 3  # evicted and captured again
    assert waits == []
    for got in runs:
        for want, have in zip(expected, got, strict=True):
            assert have.labels == want.labels
            torch.testing.assert_close(torch.tensor(have.residue_probabilities),
                                       torch.tensor(want.residue_probabilities), atol=1e-5, rtol=0)
