"""Shared fixtures: tiny random ESM-2 checkpoints in both formats, tiny FLIP-style data."""
from __future__ import annotations

import argparse
import os
import random
import socket
from pathlib import Path

import pytest
import torch

from modeling.alphabet import RESIDUES
from modeling.base import Base, load_base
from modeling.encoder import EncoderShape, EsmEncoder

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


# Ports for the services tests start. Ray's own processes bind ports while a service starts: its
# workers take ports from min_worker_port..max_worker_port (10002-19999 by default), its fixed
# defaults sit at 6379, 8265, 10001 and 52365 (and the next 40 after each), and everything else
# (raylet, object manager, agents, GCS, Serve's replicas) binds port 0, i.e. the kernel's ephemeral
# range. A port found by binding port 0 ourselves comes from that same range, and a Ray process could
# take it before the proxy bound it ("Address already in use", then every later test failed). So test
# ports come from a range no Ray process binds in, outside both; a port something already listens on
# is skipped, and no port is handed out twice in one run.
RAY_WORKER_PORTS = range(10002, 20000)
CANDIDATE_RANGES = (range(20000, 30000), range(61000, 65536), range(1025, 6000))


def ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def service_port_range() -> range:
    ephemeral = ephemeral_ports()
    for candidates in CANDIDATE_RANGES:
        if not any(r.start < candidates.stop and candidates.start < r.stop for r in (ephemeral, RAY_WORKER_PORTS)):
            return candidates
    raise RuntimeError(f"no port range outside the ephemeral ports {ephemeral} and Ray's worker ports "
                       f"{RAY_WORKER_PORTS}; narrow net.ipv4.ip_local_port_range")


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port for a service a test starts: one no Ray process can take (see above)."""
    ports = service_port_range()
    offset = os.getpid() * 7919 % len(ports)  # concurrent pytest runs start at different places
    for i in range(len(ports)):
        port = ports[(offset + i) % len(ports)]
        if port in _handed_out:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"every port in {ports} is taken")


@pytest.fixture(autouse=True, scope="module")
def no_ray_outlives_its_module():
    """A module that leaves Ray running (a failed start, a missed teardown) must not fail the next."""
    yield
    import sys
    if "ray" in sys.modules:
        from serving.serve import stop
        stop()
