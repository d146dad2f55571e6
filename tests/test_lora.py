import copy

import pytest
import torch

from bench.launches import Launches
from modeling.alphabet import tokenize
from modeling.bundle import read_bundle, write_bundle
from modeling.heads import HeadSpec, PER_RESIDUE
from modeling.lora import (LoraSpec, add_lora, export_adapter, export_positions, expected_trainable,
                           load_adapter_weights, lora_modules)
from modeling.model import TaskModel, load_task_model

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MKTLLV"]
DIMS = {"q_proj": (32, 32), "k_proj": (32, 32), "v_proj": (32, 32), "out_proj": (32, 32),
        "fc1": (32, 128), "fc2": (128, 32)}


def trainable(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


@pytest.mark.parametrize("spec", [
    LoraSpec(rank=4),
    LoraSpec(rank=8, targets=["q_proj", "v_proj"]),
    LoraSpec(rank=2, layers=[1], targets=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    LoraSpec(rank=4, tie=True),
    LoraSpec(rank=4, tie=True, position_embedding="add", targets=["attention_qkv", "mlp_fc1"]),
])
def test_trainable_parameter_count_matches_formula(tiny_base, spec):
    encoder = add_lora(tiny_base.encoder, spec, 2)
    assert trainable(encoder) == expected_trainable(spec, DIMS, 2)
    assert all(".lora_" in n for n, p in encoder.named_parameters() if p.requires_grad)


def test_formula_for_rank_16_on_the_default_shape():
    dims = {t: (320, 320) for t in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert expected_trainable(LoraSpec(rank=16), dims, 6) == 6 * 4 * 16 * 640


def test_zero_b_starts_as_identity_and_nonzero_b_does_not(tiny_base):
    tokens = tokenize(SEQS)
    with torch.no_grad():
        before = tiny_base.encoder(tokens)
        identity = add_lora(copy.deepcopy(tiny_base.encoder), LoraSpec(rank=4, init_b="zero"), 2)
        assert torch.equal(identity(tokens), before)
        changed = add_lora(copy.deepcopy(tiny_base.encoder), LoraSpec(rank=4, init_b="normal"), 2)
        assert not torch.allclose(changed(tokens), before)


def test_init_methods(tiny_base):
    encoder = add_lora(tiny_base.encoder, LoraSpec(rank=4, init_a="normal", init_b="xavier"), 2)
    m = next(iter(lora_modules(encoder).values()))
    assert 0.005 < m.lora_A["default"].weight.std() < 0.05  # normal(0, 0.02)
    assert m.lora_B["default"].weight.abs().sum() > 0


def test_layer_selection_only_touches_selected_layers(tiny_base):
    encoder = add_lora(tiny_base.encoder, LoraSpec(rank=2, layers=[1]), 2)
    assert sorted(lora_modules(encoder)) == [f"layers.1.self_attn.{t}" for t in
                                              sorted(("q_proj", "k_proj", "v_proj", "out_proj"))]
    with pytest.raises(ValueError, match="layers 0..1"):
        add_lora(copy.deepcopy(tiny_base.encoder), LoraSpec(rank=2, layers=[5]), 2)


def test_weight_tying_shares_parameters_and_add_lets_layers_differ(tiny_base):
    encoder = add_lora(tiny_base.encoder, LoraSpec(rank=4, tie=True, position_embedding="add"), 2)
    mods = lora_modules(encoder)
    a0 = mods["layers.0.self_attn.q_proj"].lora_A["default"].weight
    a1 = mods["layers.1.self_attn.q_proj"].lora_A["default"].weight
    assert a0 is a1
    assert mods["layers.0.self_attn.q_proj"].lora_position is not mods["layers.1.self_attn.q_proj"].lora_position


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="target module"):
        LoraSpec(targets=["nope"])
    with pytest.raises(ValueError, match="weight_tying"):
        LoraSpec(position_embedding="add")
    with pytest.raises(ValueError, match="init_a"):
        LoraSpec(init_a="orthogonal")


def _randomise(encoder):
    torch.manual_seed(3)
    for name, p in encoder.named_parameters():
        if p.requires_grad or name.endswith("lora_position"):
            p.data.normal_(0, 0.1)


@pytest.mark.parametrize("spec", [LoraSpec(rank=4, alpha=8), LoraSpec(rank=3, layers=[0], targets=["fc1", "fc2"]),
                                  LoraSpec(rank=2, tie=True, position_embedding="add")])
def test_exported_adapter_is_read_by_peft_itself(tiny_base, tmp_path, spec):
    """The PEFT files load with peft's PeftModel and reproduce our model's outputs exactly."""
    from peft import PeftModel
    base_copy = copy.deepcopy(tiny_base.encoder)
    model = TaskModel(add_lora(tiny_base.encoder, spec, 2), HeadSpec(PER_RESIDUE, 3, 32)).eval()
    _randomise(model.encoder)
    config, tensors = export_adapter(model.encoder, spec, 2)
    manifest = {"task": "sec_str", "mode": "lora", "output": {"kind": PER_RESIDUE, "labels": list("HEC")},
                "head": model.head_spec.as_dict(), "lora": spec.as_dict(),
                "base": {"fingerprint": tiny_base.fingerprint}}
    write_bundle(tmp_path, manifest, {"adapter_model.safetensors": tensors,
                                      "head.safetensors": model.head.state_dict(),
                                      "positions.safetensors": export_positions(model.encoder)},
                 {"adapter_config.json": config})
    tokens = tokenize(SEQS)
    with torch.no_grad():
        ours = model.encoder(tokens)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base_copy), tmp_path).eval()
        torch.testing.assert_close(peft_model(tokens), ours, atol=1e-5, rtol=1e-5)
        bundle = read_bundle(tmp_path)
        reloaded = load_task_model(base_copy, bundle)
        torch.testing.assert_close(reloaded(tokens)[0], model(tokens)[0], atol=1e-5, rtol=1e-5)
        # and training can resume from it: same weights, same outputs
        resumed = add_lora(copy.deepcopy(base_copy), spec, 2)
        load_adapter_weights(resumed, bundle.adapter, bundle.positions)
        torch.testing.assert_close(resumed(tokens), ours, atol=1e-5, rtol=1e-5)


def test_no_input_cast_under_mixed_precision_same_numbers_fewer_kernels(tiny_base):
    # out_proj and fc2 take bfloat16 inputs under autocast (q_proj a LayerNorm's float32 output).
    # Without dropout: with it, the masks drawn for a bfloat16 input differ from a float32 one's.
    spec = LoraSpec(rank=4, targets=["q_proj", "out_proj", "fc2"])
    model = TaskModel(add_lora(tiny_base.encoder, spec, 2), HeadSpec(PER_RESIDUE, 3, 32))
    _randomise(model.encoder)
    tokens = tokenize(SEQS)
    results = {}
    for cast in (True, False):  # peft's default, then add_lora's setting
        for m in lora_modules(model).values():
            m.cast_input_dtype_enabled = cast
        model.zero_grad()
        torch.manual_seed(0)  # the head's dropout: the same masks
        with Launches() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
            out, mask = model(tokens)
            loss = out[mask].float().square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[cast] = (loss.detach(), grads, ops.count)
    (loss_cast, grads_cast, ops_cast), (loss, grads, ops) = results[True], results[False]
    assert torch.equal(loss, loss_cast)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_cast))
    assert ops < ops_cast
