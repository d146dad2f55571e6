"""Shared fixtures: tiny random ESM-2 checkpoints in both formats, tiny FLIP-style data."""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest
import torch

from modeling.alphabet import RESIDUES
from modeling.base import Base, load_base
from modeling.encoder import EncoderShape, EsmEncoder
from serving.serve import ports

TINY = EncoderShape(num_layers=2, embed_dim=32, attention_heads=4)
STANDARD = "ACDEFGHIKLMNPQRSTVWY"


def tiny_hf_folder(folder: Path, seed: int = 0, bin_format: bool = False) -> Path:
    """A Hugging Face ESM folder written by transformers itself (random weights)."""
    from transformers import EsmConfig, EsmModel
    config = EsmConfig(vocab_size=33, hidden_size=TINY.embed_dim, num_hidden_layers=TINY.num_layers,
                       num_attention_heads=TINY.attention_heads, intermediate_size=4 * TINY.embed_dim,
                       max_position_embeddings=1026, position_embedding_type="rotary",
                       token_dropout=True, emb_layer_norm_before=False, pad_token_id=1,
                       mask_token_id=32, layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = EsmModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(folder, safe_serialization=not bin_format)
    if bin_format and not (folder / "pytorch_model.bin").exists():
        from safetensors.torch import load_file
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


def fair_esm_checkpoint(encoder: EsmEncoder, path: Path) -> Path:
    """The official fair-esm layout: prefixed keys plus an argparse.Namespace config."""
    state = {f"encoder.sentence_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["encoder.lm_head.bias"] = torch.zeros(33)
    cfg = argparse.Namespace(encoder_layers=encoder.shape.num_layers,
                             encoder_embed_dim=encoder.shape.embed_dim,
                             encoder_attention_heads=encoder.shape.attention_heads, token_dropout=True)
    torch.save({"model": state, "cfg": {"model": cfg}, "args": None}, path)
    return path


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture
def tiny_base(tiny_base_dir) -> Base:
    return load_base(str(tiny_base_dir))


def random_sequences(n: int, low: int = 20, high: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(STANDARD) for _ in range(rng.randint(low, high))) for _ in range(n)]


@pytest.fixture
def sec_str_csv(tmp_path) -> Path:
    """BioNeMo layout with set/validation columns and resolved masks starting with zeros."""
    rng = random.Random(1)
    lines = ["id,sequence,3state,8state,resolved,set,validation"]
    for i, seq in enumerate(random_sequences(48)):
        states = "".join(rng.choice("HEC") for _ in seq)
        resolved = "00" + "1" * (len(seq) - 2)
        split, val = ("test", "") if i >= 40 else ("train", "True" if i % 8 == 0 else "")
        lines.append(f"p{i},{seq},{states},{states},{resolved},{split},{val}")
    path = tmp_path / "sec_str.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


assert set(STANDARD) <= RESIDUES


def free_port() -> int:
    """A port for a service a test starts, from a range no Ray process binds in: a port found by
    binding port 0 comes from the kernel's ephemeral range, where Ray's own processes bind too, and
    one of them took such a port before the proxy bound it (then every later test failed).
    serving/serve/ports.py says which ranges and why."""
    return ports.free_port()


@pytest.fixture(autouse=True, scope="module")
def no_ray_outlives_its_module():
    """A module that leaves Ray running (a failed start, a missed teardown) must not fail the next."""
    yield
    import sys
    if "ray" in sys.modules:
        from serving.serve import stop
        stop()
