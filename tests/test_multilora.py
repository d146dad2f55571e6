import torch
from torch import nn

from bench.launches import Launches
from serving.engine.multilora import SlotContext, wrap_targets


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 7)))


def adapter(rank, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (d_out, d_in) in {"0": (5, 6), "2.0": (7, 5)}.items():
        layers[path] = (torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g),
                        torch.randn(d_out, generator=g) if bias else None)
    return layers


def reference(x, layers, scale, seed=0):
    model = tiny_model(seed)
    with torch.no_grad():
        for path, (a, b, bias) in layers.items():
            linear = model.get_submodule(path)
            linear.weight += scale * b @ a
            if bias is not None:
                linear.bias += scale * bias
        return model(x)


def wrapped(num_slots=3, r_max=8):
    model, context = tiny_model(), SlotContext()
    layers, store = wrap_targets(model, ("0", "2.0"), num_slots, r_max, context)
    return model, context, layers, store


def test_a_slot_reused_by_a_lower_rank_adapter_holds_only_that_adapter():
    model, context, layers, store = wrapped()
    x = torch.randn(2, 4, 6)
    high, low = adapter(8, 1, bias=True), adapter(2, 2)
    store.load(1, store.pack(high, 0.5))
    for path in store.pack(high, 0.5).bias_paths:
        layers[path].use_bias = True
    store.load(1, store.pack(low, 2.0))  # same slot: rows 2..7 and the bias must be gone
    store.load(2, store.pack(high, 0.5))
    context.rows = store.gather(torch.tensor([1, 2]))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out[0], reference(x[:1], low, 2.0)[0])
    torch.testing.assert_close(out[1], reference(x[1:], high, 0.5)[0])
    context.rows = store.gather(torch.tensor([0, 0]))  # slot 0: the base alone
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_model()(x))


def test_unpack_returns_what_merging_adds():
    *_, store = wrapped()
    layers = adapter(3, 5, bias=True)
    unpacked = store.unpack(store.pack(layers, 0.25))
    assert set(unpacked) == set(layers)
    for path, (a, b, bias) in layers.items():
        got_a, got_b, got_bias = unpacked[path]
        torch.testing.assert_close(got_b @ got_a, 0.25 * b @ a)
        torch.testing.assert_close(got_bias, 0.25 * bias)
    only_first = store.unpack(store.pack({"0": layers["0"]}, 1.0))
    assert set(only_first) == {"0"}  # an untargeted layer is not merged


def test_loading_an_adapter_is_one_copy_whatever_the_number_of_layers():
    *_, store = wrapped(r_max=8)
    packed = store.pack(adapter(4, 3, bias=True), 1.0)
    with Launches() as ops:
        store.load(1, packed)
    assert ops.count == 2  # the prefix copy and the zero fill


def test_the_packed_lora_and_attention_forms_agree():
    """The CUDA forms (padded view) and the CPU forms (per segment) of the packed LoRA term and
    attention compute the same thing; varlen attention itself runs in the GPU check."""
    from modeling.encoder import Packing, padded_attention, segment_attention
    from serving.engine.multilora import lora_padded, lora_segments
    torch.manual_seed(0)
    lengths = [3, 17, 9, 30]
    tokens = torch.full((4, 30), 1)
    for row, n in enumerate(lengths):
        tokens[row, :n] = 5
    packing = Packing(tokens)
    n, d_in, d_out, r = sum(lengths), 12, 20, 4
    x, y = torch.randn(n, d_in), torch.randn(n, d_out)
    a, bt, bias = torch.randn(4, r, d_in), torch.randn(4, r, d_out), torch.randn(4, d_out)
    for b in (None, bias):
        torch.testing.assert_close(lora_segments(x, y.clone(), a, bt, b, packing), lora_padded(x, y, a, bt, b, packing))
    start = sum(lengths[:2])  # row 2's own term, computed alone
    torch.testing.assert_close(lora_padded(x, y, a, bt, bias, packing)[start:start + 9],
                               y[start:start + 9] + x[start:start + 9] @ a[2].T @ bt[2] + bias[2])
    q, k, v = (torch.randn(n, 2, 8) for _ in range(3))
    torch.testing.assert_close(segment_attention(q, k, v, packing), padded_attention(q, k, v, packing))
    alone = torch.nn.functional.scaled_dot_product_attention(*(t[:3].transpose(0, 1) for t in (q, k, v)))
    torch.testing.assert_close(segment_attention(q, k, v, packing)[:3], alone.transpose(0, 1))
