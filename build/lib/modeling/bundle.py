"""The adapter bundle: the unit training publishes and serving loads.

A bundle is a folder of safetensors + JSON (never pickles):
  adapter_config.json, adapter_model.safetensors  PEFT's own format (absent for head-only bundles)
  head.safetensors                                the task head
  positions.safetensors                           optional: raw `add`-strategy vectors (training only)
  manifest.json                                   written LAST; lists sha256 of every other file
Where bundles live in a registry, and how they are published there: modeling/registry.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from modeling.kinds import KINDS, PER_RESIDUE, REGRESSION, HeadSpec

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where tensors are read or written: the manifest's rules, names and
# checks stay importable by the light command lines (`--help`, `registry list` start-up).

FORMAT = "esm-adapters/bundle@1"
MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
POSITIONS = "positions.safetensors"
ENCODER_WEIGHTS = "encoder.safetensors"  # full fine-tuning only: the whole encoder
MODES = ("lora", "frozen", "full")


WEIGHT_DTYPES = ("float32", "float16", "bfloat16")  # torch dtypes, by name
_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bundle-sha256")
T = TypeVar("T")


class BundleError(ValueError):
    """A bundle that must not be loaded; the message says why."""


def shown(text: str, limit: int = 80) -> str:
    """A user-supplied string quoted for an error message, cut short (messages travel as headers)."""
    return repr(text[:limit]) + (f" ({len(text)} characters)" if len(text) > limit else "")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


MAX_MANIFEST_BYTES = 1 << 20  # a real manifest is a few KB (its training config included)
MAX_JSON_DEPTH = 32
MAX_RANK = 4096  # a sanity bound; a server refuses ranks above its own r_max anyway
MAX_LABELS = 4096
MAX_TEXT = 256
MAX_FILES = 16
DIGEST = re.compile(r"^[0-9a-f]{64}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _depth(value, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of parsed JSON, walked without recursion (a deep document must not blow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _get(mapping: dict, key: str, kind, where: str, required: bool = True):
    if key not in mapping:
        if required:
            raise BundleError(f"manifest: missing {where}{key}")
        return None
    value = mapping[key]
    # bool is an int in Python, never what a numeric field means
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise BundleError(f"manifest: {where}{key} must be {_type_name(kind)}, not {type(value).__name__}")
    return value


def _type_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list",
             bool: "true or false", type(None): "null"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _number(mapping: dict, key: str, where: str, low: float, high: float, integer: bool = False,
            required: bool = True):
    value = _get(mapping, key, int if integer else (int, float), where, required)
    if value is None:
        return None
    if not (math.isfinite(value) and low <= value <= high):
        raise BundleError(f"manifest: {where}{key}={shown(str(value), 24)} is outside [{low}, {high}]")
    return value


def _text(mapping: dict, key: str, where: str, required: bool = True, limit: int = MAX_TEXT):
    value = _get(mapping, key, str, where, required)
    if value is not None and len(value) > limit:
        raise BundleError(f"manifest: {where}{key} is longer than {limit} characters")
    return value


def check_manifest(manifest: dict) -> dict:
    """The schema of a manifest: every field the registry, the engine and the listing read, with its
    type and range, so that nothing read later can raise on a manifest that passed. Returns the
    manifest; raises BundleError naming the first problem."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"manifest: format is not {FORMAT!r}")
    if _depth(manifest) > MAX_JSON_DEPTH:
        raise BundleError(f"manifest: nested deeper than {MAX_JSON_DEPTH} levels")
    _text(manifest, "task", "")
    mode = _text(manifest, "mode", "")
    if mode not in MODES:
        raise BundleError(f"manifest: mode {shown(mode, 20)} not in {MODES}")
    _text(manifest, "name", "", required=False, limit=64)
    _number(manifest, "version", "", 1, 2**63 - 1, integer=True, required=False)
    output = _get(manifest, "output", dict, "")
    kind = _text(output, "kind", "output.")
    if kind not in KINDS:
        raise BundleError(f"manifest: output.kind must be one of {KINDS}")
    labels = _get(output, "labels", list, "output.")
    if len(labels) > MAX_LABELS or not all(isinstance(label, str) and 0 < len(label) <= MAX_TEXT for label in labels):
        raise BundleError(f"manifest: output.labels must be at most {MAX_LABELS} non-empty strings")
    if len(set(labels)) != len(labels):
        raise BundleError("manifest: output.labels repeat a label")
    if kind == PER_RESIDUE and any(len(label) != 1 for label in labels):
        raise BundleError("manifest: per-residue labels are one character each")
    if kind == REGRESSION:
        if labels:
            raise BundleError("manifest: a regression has no output.labels")
        _number(output, "target_mean", "output.", -1e30, 1e30, required=False)
        _number(output, "target_std", "output.", 1e-30, 1e30, required=False)
    elif len(labels) < 2:
        raise BundleError(f"manifest: {kind} needs at least two output.labels")
    check_head(_get(manifest, "head", dict, ""), kind, len(labels) or 1)
    base = _get(manifest, "base", dict, "")
    if not DIGEST.match(_text(base, "fingerprint", "base.")):
        raise BundleError("manifest: base.fingerprint must be a sha256 hex string")
    lora = _get(manifest, "lora", (dict, type(None)), "", required=False)
    if mode == "lora" and lora is None:
        raise BundleError("manifest: lora is required for a lora bundle")
    if lora is not None:
        _number(lora, "rank", "lora.", 1, MAX_RANK, integer=True)
        _number(lora, "alpha", "lora.", 1e-12, 1e12, required=False)
        targets = _get(lora, "targets", list, "lora.", required=False) or []
        if len(targets) > 64 or not all(isinstance(t, str) and len(t) <= 64 for t in targets):
            raise BundleError("manifest: lora.targets must be a list of module names")
    metrics = _get(manifest, "metrics", (dict, type(None)), "", required=False) or {}
    if not all(isinstance(split, str) and isinstance(values, dict) for split, values in metrics.items()):
        raise BundleError("manifest: metrics must map each split to an object of values")
    files = _get(manifest, "files", dict, "")
    if len(files) > MAX_FILES:
        raise BundleError(f"manifest: more than {MAX_FILES} files")
    for fname, digest in files.items():
        if not FILE_NAME.match(fname) or not isinstance(digest, str) or not DIGEST.match(digest):
            raise BundleError(f"manifest: bad file entry {shown(fname, 40)}: a plain file name and its sha256")
    needed = {HEAD_WEIGHTS} | ({ADAPTER_CONFIG, ADAPTER_WEIGHTS} if mode == "lora" else set()) \
        | ({ENCODER_WEIGHTS} if mode == "full" else set())
    if missing := needed - set(files):
        raise BundleError(f"manifest: files {sorted(missing)} are required for mode {mode}")
    return manifest


def check_head(head: dict, kind: str, outputs: int) -> HeadSpec:
    """The head spec against the output it must produce: its keys, kind, sizes and output count."""
    if unknown := set(head) - set(HeadSpec.__dataclass_fields__):
        raise BundleError(f"manifest: unknown head keys {sorted(map(str, unknown))[:5]}")
    if _text(head, "kind", "head.") != kind:
        raise BundleError(f"manifest: head.kind {shown(head['kind'], 20)} does not match output.kind {kind!r}")
    if _number(head, "num_outputs", "head.", 1, MAX_LABELS, integer=True) != outputs:
        raise BundleError(f"manifest: head.num_outputs={head['num_outputs']} but the output has {outputs} "
                          f"{'labels' if kind != REGRESSION else 'value'}")
    _number(head, "embed_dim", "head.", 1, 1 << 16, integer=True)
    _number(head, "hidden", "head.", 1, 1 << 16, integer=True, required=False)
    _number(head, "dropout", "head.", 0, 1, required=False)
    kernel = _number(head, "kernel", "head.", 1, 63, integer=True, required=False)
    if kernel is not None and kernel % 2 == 0:
        raise BundleError("manifest: head.kernel must be odd (the convolution keeps the sequence length)")
    return HeadSpec(**head)


def write_bundle(folder: Path, manifest: dict, tensors: dict[str, dict[str, "torch.Tensor"]],
                 json_files: dict[str, dict]) -> dict:
    """Write files, then the manifest with their checksums (last: it makes the bundle exist)."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    for fname, group in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, folder / fname)
    for fname, payload in json_files.items():
        (folder / fname).write_text(json.dumps(payload, indent=2, sort_keys=True))
    manifest = dict(manifest, format=FORMAT,
                    files={f: sha256_file(folder / f) for f in sorted({*tensors, *json_files})})
    check_manifest(manifest)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return manifest


@dataclass
class Bundle:
    folder: Path
    manifest: dict
    adapter_config: dict | None
    adapter: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]
    encoder: dict[str, torch.Tensor]

    @property
    def ref(self) -> str:
        return f"{self.manifest.get('name')}@{self.manifest.get('version')}"


def refuse_symlinks(*paths: Path) -> None:
    """A bundle is made of real files: a link could point anywhere outside the registry."""
    for path in paths:
        if path.is_symlink():
            raise BundleError(f"{path} is a symlink; bundles must hold real files and folders")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_manifest(data: bytes, where: Path) -> dict:
    """A manifest's bytes -> the checked manifest. Whatever the bytes (huge, deeply nested, numbers
    of 10,000 digits, NaN), the only error raised is a BundleError saying what is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8 and int-size errors are ValueErrors
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({str(exc)[:120]})") from None
    return check_manifest(manifest)


def identity_of(data: bytes) -> str:
    """A version's content identity: the sha256 of its manifest's bytes, which list every other
    file's sha256 (so two versions share an identity only if every byte they serve is the same)."""
    return hashlib.sha256(data).hexdigest()


def read_manifest_bytes(folder: Path) -> bytes:
    path = Path(folder) / MANIFEST
    refuse_symlinks(Path(folder), path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise BundleError(f"{folder}: no {MANIFEST}") from None
    except IsADirectoryError:
        raise BundleError(f"{folder}: {MANIFEST} is not a file") from None
    return data


def load_manifest(folder: Path) -> tuple[dict, str]:
    """(checked manifest, identity) of the bundle in `folder`."""
    data = read_manifest_bytes(folder)
    return parse_manifest(data, Path(folder)), identity_of(data)


def read_manifest(folder: Path) -> dict:
    return load_manifest(folder)[0]


def first_non_finite(group: dict[str, torch.Tensor]) -> str | None:
    """The first tensor holding a NaN or Inf, if any. A sum is finite unless an element is NaN or
    Inf (or the sum overflows: then each tensor is looked at): for a 650M adapter's 264 tensors
    2 ms, where an element-wise check of each took 20 ms of a 50 ms load."""
    if not group:
        return None
    import torch
    sums = torch.stack([tensor.sum(dtype=torch.float32) for tensor in group.values()])
    if torch.isfinite(sums).all():
        return None
    return next((key for key, tensor in group.items() if not torch.isfinite(tensor).all()), None)


def read_bundle(folder: Path, prepare: Callable[[Bundle], T] = lambda bundle: bundle, identity: str | None = None) -> T:
    """Load and verify a bundle: schema, every checksum, safetensors only. `prepare` (by default
    the bundle itself) turns the parsed bundle into what the caller keeps; it runs while the
    checksums are computed on other threads (a 650M adapter's sha256 is ~20 ms, as long as parsing
    and packing it), so it must change nothing outside what it returns: that is returned only once
    every checksum matches, and a mismatch is reported before any error of parsing or `prepare`.
    `identity`: the version's identity as listed; a manifest with other bytes is refused (a load
    can then never serve other bytes under the identity that was listed)."""
    folder = Path(folder)
    data = read_manifest_bytes(folder)
    if identity is not None and identity_of(data) != identity:
        raise BundleError(f"{folder}: {MANIFEST} changed after this version was listed")
    manifest = parse_manifest(data, folder)
    for fname in manifest["files"]:  # before reading a byte: nothing else is ever deserialised
        if not fname.endswith((".safetensors", ".json")):
            raise BundleError(f"{folder}: {fname} is neither safetensors nor JSON")
    # Each file is read once: the bytes checked are the bytes parsed (a file swapped after its
    # checksum cannot slip in), and a 650M adapter is not read from disk twice.
    contents: dict[str, bytes] = {}
    for fname in manifest["files"]:
        path = folder / fname
        refuse_symlinks(path)
        if not path.is_file():
            raise BundleError(f"{folder}: file {fname} listed in the manifest is missing")
        contents[fname] = path.read_bytes()
    # hashlib releases the GIL on large inputs, so the digests run beside the parsing below.
    digests = {fname: _HASHERS.submit(lambda data: hashlib.sha256(data).hexdigest(), data)
               for fname, data in contents.items()}
    try:
        result, failure = prepare(parse_bundle(folder, manifest, contents)), None
    except Exception as exc:
        result, failure = None, exc
    for fname, digest in digests.items():
        if digest.result() != manifest["files"][fname]:
            raise BundleError(f"{folder}: checksum mismatch for {fname}") from failure
    if failure is not None:
        raise failure
    return result


def parse_bundle(folder: Path, manifest: dict, contents: dict[str, bytes]) -> Bundle:
    """The bundle's tensors and config from its files' bytes, each checked for dtype and finiteness.
    Each file's bytes leave `contents` once parsed (a full fine-tune's are the whole encoder)."""
    from safetensors.torch import load

    def tensors(fname: str) -> dict[str, "torch.Tensor"]:
        try:
            group = load(contents.pop(fname)) if fname in contents else {}
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{folder}: {fname} is not a valid safetensors file ({exc})") from exc
        for key, tensor in group.items():  # checksums prove integrity, not sanity
            if str(tensor.dtype).removeprefix("torch.") not in WEIGHT_DTYPES:
                raise BundleError(f"{key}: dtype {tensor.dtype} is not a weight dtype {WEIGHT_DTYPES}")
        if key := first_non_finite(group):
            raise BundleError(f"{key}: weights are not finite (NaN or Inf)")
        return group

    config = None
    if ADAPTER_CONFIG in contents:
        try:
            config = json.loads(contents.pop(ADAPTER_CONFIG))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{folder}: {ADAPTER_CONFIG} is not valid JSON ({exc})") from exc
    return Bundle(folder, manifest, config, tensors(ADAPTER_WEIGHTS), tensors(HEAD_WEIGHTS),
                  tensors(POSITIONS), tensors(ENCODER_WEIGHTS))
