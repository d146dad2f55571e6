"""The adapter bundle: the unit training publishes and serving loads.

A bundle is a folder of safetensors + JSON (never pickles):
  adapter_config.json, adapter_model.safetensors  PEFT's own format (absent for head-only bundles)
  head.safetensors                                the task head
  positions.safetensors                           optional: raw `add`-strategy vectors (training only)
  manifest.json                                   written LAST; lists sha256 of every other file
In a registry, bundles live at <registry>/<name>/<version>/ with integer versions, and are
published by writing a staging folder inside the registry and renaming it into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load, save_file

from modeling.heads import KINDS

FORMAT = "esm-adapters/bundle@1"
MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
POSITIONS = "positions.safetensors"
ENCODER_WEIGHTS = "encoder.safetensors"  # full fine-tuning only: the whole encoder
STAGING = ".staging"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODES = ("lora", "frozen", "full")


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bundle-sha256")
T = TypeVar("T")


class BundleError(ValueError):
    """A bundle that must not be loaded; the message says why."""


def shown(text: str, limit: int = 80) -> str:
    """A user-supplied string quoted for an error message, cut short (messages travel as headers)."""
    return repr(text[:limit]) + (f" ({len(text)} characters)" if len(text) > limit else "")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise BundleError(f"invalid adapter name {shown(str(name))}: use 1-64 letters, digits, '-', '_' "
                          f"or '.', starting with a letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'NAME' -> (NAME, None = newest); 'NAME@VERSION' -> (NAME, VERSION)."""
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or len(version) > 9 or int(version) < 1:
        raise BundleError(f"invalid version in {shown(ref)}: expected a positive integer")
    return name, int(version)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _require(manifest: dict, key: str, kind: type | tuple):
    if key not in manifest:
        raise BundleError(f"manifest: missing {key!r}")
    if not isinstance(manifest[key], kind):
        raise BundleError(f"manifest: {key!r} has the wrong type")
    return manifest[key]


def check_manifest(manifest: dict) -> dict:
    """Schema check; returns the manifest. Raises BundleError naming the first problem."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"manifest: format is not {FORMAT!r}")
    _require(manifest, "task", str)
    mode = _require(manifest, "mode", str)
    if mode not in MODES:
        raise BundleError(f"manifest: mode {mode!r} not in {MODES}")
    output = _require(manifest, "output", dict)
    if output.get("kind") not in KINDS:
        raise BundleError(f"manifest: output.kind must be one of {KINDS}")
    if not isinstance(output.get("labels"), list):
        raise BundleError("manifest: output.labels must be a list")
    _require(manifest, "head", dict)
    base = _require(manifest, "base", dict)
    if not isinstance(base.get("fingerprint"), str) or len(base["fingerprint"]) != 64:
        raise BundleError("manifest: base.fingerprint must be a sha256 hex string")
    lora = manifest.get("lora")
    if mode == "lora":
        if not isinstance(lora, dict) or not isinstance(lora.get("rank"), int):
            raise BundleError("manifest: lora.rank is required for a lora bundle")
    files = _require(manifest, "files", dict)
    for fname, digest in files.items():
        if "/" in fname or "\\" in fname or fname.startswith(".") or not isinstance(digest, str):
            raise BundleError(f"manifest: bad file entry {fname!r}")
    needed = {HEAD_WEIGHTS} | ({ADAPTER_CONFIG, ADAPTER_WEIGHTS} if mode == "lora" else set()) \
        | ({ENCODER_WEIGHTS} if mode == "full" else set())
    if missing := needed - set(files):
        raise BundleError(f"manifest: files {sorted(missing)} are required for mode {mode}")
    return manifest


def write_bundle(folder: Path, manifest: dict, tensors: dict[str, dict[str, torch.Tensor]],
                 json_files: dict[str, dict]) -> dict:
    """Write files, then the manifest with their checksums (last: it makes the bundle exist)."""
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


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    refuse_symlinks(folder, path)
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{folder}: {MANIFEST} is not valid JSON ({exc})") from exc
    return check_manifest(manifest)


def first_non_finite(group: dict[str, torch.Tensor]) -> str | None:
    """The first tensor holding a NaN or Inf, if any. A sum is finite unless an element is NaN or
    Inf (or the sum overflows: then each tensor is looked at): for a 650M adapter's 264 tensors
    2 ms, where an element-wise check of each took 20 ms of a 50 ms load."""
    if not group:
        return None
    sums = torch.stack([tensor.sum(dtype=torch.float32) for tensor in group.values()])
    if torch.isfinite(sums).all():
        return None
    return next((key for key, tensor in group.items() if not torch.isfinite(tensor).all()), None)


def read_bundle(folder: Path, prepare: Callable[[Bundle], T] = lambda bundle: bundle) -> T:
    """Load and verify a bundle: schema, every checksum, safetensors only. `prepare` (by default
    the bundle itself) turns the parsed bundle into what the caller keeps; it runs while the
    checksums are computed on other threads (a 650M adapter's sha256 is ~20 ms, as long as parsing
    and packing it), so it must change nothing outside what it returns: that is returned only once
    every checksum matches, and a mismatch is reported before any error of parsing or `prepare`."""
    folder = Path(folder)
    manifest = read_manifest(folder)
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
    def tensors(fname: str) -> dict[str, torch.Tensor]:
        try:
            group = load(contents.pop(fname)) if fname in contents else {}
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{folder}: {fname} is not a valid safetensors file ({exc})") from exc
        for key, tensor in group.items():  # checksums prove integrity, not sanity
            if tensor.dtype not in WEIGHT_DTYPES:
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


def versions(registry: Path, name: str) -> list[int]:
    folder = Path(registry) / validate_name(name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def staging_dir(registry: Path) -> Path:
    """A private folder inside the registry (same filesystem, so the final rename is atomic)."""
    root = Path(registry) / STAGING
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root))


def publish(staged: Path, registry: Path, name: str) -> Path:
    """Atomically move a complete staged bundle to <registry>/<name>/<next version>."""
    validate_name(name)
    manifest = read_manifest(staged)
    parent = Path(registry) / name
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        version = (versions(registry, name) or [0])[-1] + 1
        manifest.update(name=name, version=version)
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(staged, parent / str(version))  # fails if another publisher took the number
            return parent / str(version)
        except OSError:
            time.sleep(0.01)
    raise BundleError(f"could not publish {name}: too many concurrent publishers")


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)
