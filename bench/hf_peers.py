"""The Hugging Face peers: transformers' EsmModel (sdpa attention) holding the same weights, and
peft's own mixed-adapter batches on it (`adapter_names=`, one adapter per row): what a user of the
HF stack writes first for one adapter and for many. Both answer the same (adapter, sequence)
requests as the engine, in sorted batches of a fixed number of sequences, heads included, with
the answers copied to the host (as the engine's are)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.engine import rates
from modeling import bundle as bundles
from modeling.alphabet import MASK, PAD, TOKENS, tokenize
from modeling.base import internal_to_hf
from modeling.encoder import EsmEncoder
from modeling.heads import HeadSpec, build_head
from modeling.heads import residues as residue_part
from modeling.lora import PEFT_PREFIX

LORA_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def hf_esm(encoder: EsmEncoder, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' EsmModel (no pooler) with `encoder`'s weights, sdpa attention."""
    from transformers import EsmConfig, EsmModel

    shape = encoder.shape
    config = EsmConfig(vocab_size=len(TOKENS), hidden_size=shape.embed_dim, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.attention_heads, intermediate_size=4 * shape.embed_dim,
                       position_embedding_type="rotary", token_dropout=shape.token_dropout,
                       emb_layer_norm_before=False, layer_norm_eps=1e-5, pad_token_id=PAD,
                       mask_token_id=MASK, max_position_embeddings=1026)
    config._attn_implementation = "sdpa"
    model = EsmModel(config, add_pooling_layer=False)
    state = {k.removeprefix("esm."): v for k, v in internal_to_hf(encoder.state_dict()).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    weights = [k for k in missing if not k.endswith("inv_freq") and not k.startswith(("contact_head.", "embeddings.position_ids"))]
    if weights or unexpected:
        raise ValueError(f"EsmModel does not take these weights: missing {weights}, unexpected {unexpected}")
    return model.to(device, dtype).eval()


def hf_lora_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A bundle's LoRA weights under EsmModel's module names (peft's saved-key form) and its config."""
    from modeling.base import _HF_LAYER_MAP

    hf_module = {ours: theirs for theirs, ours in _HF_LAYER_MAP.items()}
    config = json.loads((folder / bundles.ADAPTER_CONFIG).read_text())
    state = {}
    for key, value in load_file(folder / bundles.ADAPTER_WEIGHTS).items():
        match = LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise ValueError(f"{folder}: {key} is not a plain LoRA weight (the peer takes plain adapters)")
        layer, module, which = match.groups()
        state[f"base_model.model.encoder.layer.{layer}.{hf_module[module]}.lora_{which}.weight"] = value
    return state, config


class HfPeftMixed:
    """peft's PeftModel over EsmModel holding every adapter; a batch names one adapter per row."""

    def __init__(self, model: torch.nn.Module, registry: Path, names: list[str]):
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        self.heads, self.peft = {}, None
        for name in names:
            folder = registry / name / "1"
            state, saved = hf_lora_state(folder)
            targets = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in state})
            config = LoraConfig(r=saved["r"], lora_alpha=saved["lora_alpha"], target_modules=targets,
                                lora_dropout=0.0, use_rslora=saved.get("use_rslora", False))
            if self.peft is None:
                self.peft = get_peft_model(model, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
            result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
            if result.unexpected_keys:
                raise ValueError(f"{name}: peft did not take {result.unexpected_keys[:3]}")
            manifest = json.loads((folder / bundles.MANIFEST).read_text())
            self.heads[name] = build_head(HeadSpec(**manifest["head"])).eval()
            self.heads[name].load_state_dict(load_file(folder / bundles.HEAD_WEIGHTS))
        self.peft.eval()
        param = next(model.parameters())
        for head in self.heads.values():
            head.to(param.device, param.dtype)

    def outputs(self, requests: list[tuple[str, str]], batch: int) -> list[torch.Tensor]:
        """Each request's head output (on the host), in request order."""
        order = sorted(range(len(requests)), key=lambda i: len(requests[i][1]))
        device = next(self.peft.parameters()).device
        out: list[torch.Tensor | None] = [None] * len(requests)
        with torch.no_grad():
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                tokens = tokenize([requests[i][1] for i in idx]).to(device)
                names = [requests[i][0] for i in idx]
                hidden = self.peft(input_ids=tokens, attention_mask=tokens.ne(PAD),
                                   adapter_names=names).last_hidden_state
                reps, mask = residue_part(hidden, tokens.ne(PAD).sum(-1) - 2)
                for name in dict.fromkeys(names):
                    rows = [r for r, n in enumerate(names) if n == name]
                    answers = self.heads[name](reps[rows], mask[rows]).float().cpu()
                    for row, answer in zip(rows, answers):  # per-residue answers cut to their sequence
                        out[idx[row]] = answer[:len(requests[idx[row]][1])] if answer.dim() == 2 else answer
        return out  # type: ignore[return-value]

    def serve(self, requests: list[tuple[str, str]], batch: int) -> dict:
        start = time.perf_counter()
        self.outputs(requests, batch)
        return rates(requests, time.perf_counter() - start)


def hf_serve(model: torch.nn.Module, head: torch.nn.Module, sequences: list[str], batch: int) -> dict:
    """One adapter merged into EsmModel's weights (the single-adapter peer): sorted batches of `batch`."""
    device = next(model.parameters()).device
    seqs = sorted(sequences, key=len)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            tokens = tokenize(seqs[i:i + batch]).to(device)
            hidden = model(input_ids=tokens, attention_mask=tokens.ne(PAD)).last_hidden_state
            reps, mask = residue_part(hidden, tokens.ne(PAD).sum(-1) - 2)
            head(reps, mask).float().cpu()
    return rates([("", s) for s in seqs], time.perf_counter() - start)
