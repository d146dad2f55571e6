"""The registry folder on disk, on the ground floor (training publishes, serving watches, the CLI
edits): its layout, the rules for names and versions, publish, remove, resolve, the high-water mark,
and what a server with given limits can serve.

  <registry>/<name>/<version>/      a published version: a bundle (modeling/bundle.py), immutable
  <registry>/<name>/.claimed/<v>    one empty file per version number ever handed out
  <registry>/.staging/              private: bundles being published, versions being removed

A version number is never reused: publish claims the next number above every claim and every
folder by creating its claim file exclusively (O_EXCL, atomic on local filesystems and NFS v3+), so
two processes, on one machine or several sharing the volume, never get the same number, and a
removed `x@3` is never `x@3` again, also after a restart. `remove` claims what it removes, so a
version copied in by hand is not reused either once it is removed here.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modeling import bundle as bundles
from modeling.bundle import BundleError, shown
from modeling.targets import ALL_TARGETS

STAGING = ".staging"
CLAIMS = ".claimed"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,18}$")  # ASCII digits only: str.isdigit() accepts '²'
MAX_VERSION = 2**63 - 1  # versions travel as int64 (ListAdapters)


class InvalidRef(BundleError):
    """A name or NAME@VERSION that is not valid (it could not name a folder of the registry)."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidRef(f"invalid adapter name {shown(str(name))}: use 1-64 letters, digits, '-', '_' "
                         f"or '.', starting with a letter or digit")
    return name


def version_of(text: str) -> int | None:
    """The version a folder or ref names (ASCII digits, no leading zero, within int64), else None."""
    if not VERSION_RE.match(text):
        return None
    version = int(text)
    return version if version <= MAX_VERSION else None


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'NAME' -> (NAME, None = newest); 'NAME@VERSION' -> (NAME, VERSION)."""
    if not isinstance(ref, str):
        raise InvalidRef(f"invalid adapter reference {shown(str(ref))}")
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    number = version_of(version)
    if number is None:
        raise InvalidRef(f"invalid version in {shown(ref)}: expected a positive integer below 2**63")
    return name, number


# ---- reading the layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionFolder:
    name: str
    version: int
    folder: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def walk(root: Path) -> tuple[list[VersionFolder], list[str]]:
    """Every version folder under `root`, and what was skipped and why (names that are not valid
    adapter names or versions, folders that vanished or could not be read while walking). Raises
    OSError only when `root` itself cannot be listed."""
    found, skipped = [], []
    for name_dir in sorted(Path(root).iterdir()):
        if name_dir.name.startswith("."):
            continue
        try:
            if not name_dir.is_dir():
                continue
            try:
                validate_name(name_dir.name)
            except InvalidRef:
                skipped.append(f"{shown(name_dir.name, 40)}: not a valid adapter name")
                continue
            for version_dir in name_dir.iterdir():
                if version_dir.name.startswith("."):
                    continue
                version = version_of(version_dir.name)
                if version is None:
                    skipped.append(f"{name_dir.name}/{shown(version_dir.name, 40)}: not a version "
                                   f"(versions are 1 to 2**63-1 in ASCII digits)")
                elif version_dir.is_dir() or version_dir.is_symlink():
                    found.append(VersionFolder(name_dir.name, version, version_dir))
        except OSError as exc:  # one name folder removed or unreadable mid-walk: the others go on
            skipped.append(f"{shown(name_dir.name, 40)}: unreadable ({exc.strerror or exc})")
    return found, skipped


def versions(root: Path, name: str) -> list[int]:
    folder = Path(root) / validate_name(name)
    if not folder.is_dir():
        return []
    return sorted(v for p in folder.iterdir() if (v := version_of(p.name)) is not None and p.is_dir())


def pick(available, version: int | None):
    """The version a ref means among `available` (numbers): the newest, or the one pinned, or None."""
    if version is None:
        return max(available, default=None)
    return version if version in available else None


def resolve(root: Path, ref: str) -> Path:
    """NAME or NAME@VERSION -> the version's folder on disk; BundleError if there is none."""
    name, version = parse_ref(ref)
    chosen = pick(versions(root, name), version)
    if chosen is None:
        raise BundleError(f"adapter {ref!r} not found in registry {root}")
    return Path(root) / name / str(chosen)


def file_stamps(folder: Path) -> dict[str, tuple[int, int, bool]]:
    """file name -> (size, mtime in ns, is a symlink) of everything in a version folder: any write,
    replacement, addition or removal of a file changes it (the watcher compares these)."""
    stamps = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            stamps[entry.name] = (info.st_size, info.st_mtime_ns, entry.is_symlink())
    return stamps


# ---- the high-water mark ------------------------------------------------------------------------
def high_water(root: Path, name: str) -> int:
    """The highest version number `name` has ever had here: claimed, or present as a folder."""
    parent = Path(root) / validate_name(name)
    numbers = [0, *versions(root, name)]
    claims = parent / CLAIMS
    if claims.is_dir():
        numbers += [v for p in claims.iterdir() if (v := version_of(p.name)) is not None]
    return max(numbers)


def claim(root: Path, name: str, version: int) -> bool:
    """Mark `version` of `name` as used for good; False if it already was."""
    claims = Path(root) / validate_name(name) / CLAIMS
    claims.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(claims / str(version), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def claim_next(root: Path, name: str, attempts: int = 10_000) -> int:
    """A version number no publisher has had or will have (see the module docstring)."""
    for _ in range(attempts):
        version = high_water(root, name) + 1
        if version > MAX_VERSION:
            raise BundleError(f"{name}: no version numbers left")
        if claim(root, name, version) and not (Path(root) / name / str(version)).exists():
            return version
    raise BundleError(f"could not claim a version of {name}: too many concurrent publishers")


# ---- changing the registry ---------------------------------------------------------------------
def staging_dir(root: Path) -> Path:
    """A private folder inside the registry (same filesystem, so the final rename is atomic)."""
    staging = Path(root) / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=staging))


def publish(staged: Path, root: Path, name: str) -> Path:
    """Move a complete staged bundle to <root>/<name>/<a new version>, atomically: the version
    appears whole or not at all. Its manifest records the name and version it was given."""
    validate_name(name)
    manifest = bundles.read_manifest(staged)
    while True:
        version = claim_next(root, name)
        manifest.update(name=name, version=version)
        (staged / bundles.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        target = Path(root) / name / str(version)
        try:
            os.rename(staged, target)
            return target
        except OSError as exc:  # a folder of that number copied in by hand meanwhile: take the next
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


def push(bundle_folder: Path, root: Path, name: str | None = None) -> Path:
    """Verify a bundle folder (every checksum), copy it into staging, publish it as a new version."""
    source = bundles.read_bundle(Path(bundle_folder))
    name = name or source.manifest.get("name")
    if not name:
        raise BundleError(f"{bundle_folder}: its manifest has no name; pass --name")
    staged = staging_dir(root)
    try:
        for fname in [*source.manifest["files"], bundles.MANIFEST]:
            shutil.copy2(Path(bundle_folder) / fname, staged / fname)
        return publish(staged, root, name)
    finally:
        discard(staged)  # nothing left behind after a failure (a no-op after the rename)


def remove(root: Path, ref: str) -> list[Path]:
    """Remove NAME (every version) or NAME@VERSION. Each version is claimed (never reused) and
    renamed away first, so readers see it vanish at once. The name's claims stay."""
    name, version = parse_ref(ref)
    available = versions(root, name)
    targets = available if version is None else [v for v in available if v == version]
    if not targets:
        raise BundleError(f"adapter {ref!r} not found in {root}")
    removed = []
    for v in targets:
        claim(root, name, v)
        folder = Path(root) / name / str(v)
        trash = staging_dir(root)
        folder.rename(trash / "removed")
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(folder)
    return removed


# ---- what a server can serve -------------------------------------------------------------------
@dataclass(frozen=True)
class ServeLimits:
    """A server's limits on what it serves; the defaults every serving entry point starts from
    (`serving.serve`, the Serve config, `registry list`)."""
    r_max: int = 16
    # every linear layer: built-in tasks' recipes train fc1/fc2 too (gb1's, bench/results). A slot holds
    # r_max rows of every target, so this is ~2.25x the attention-only slot (docs/serving.md).
    targets: tuple[str, ...] = ALL_TARGETS


@dataclass(frozen=True)
class ServeRule:
    """What a server on a base (fingerprint, width) with `limits` can serve."""
    fingerprint: str
    embed_dim: int
    limits: ServeLimits = ServeLimits()

    def __call__(self, manifest: dict) -> str | None:
        """The reason a checked manifest cannot be served here, or None."""
        trained_on = manifest["base"]["fingerprint"]
        if trained_on != self.fingerprint:
            return f"base fingerprint mismatch: trained on {trained_on[:12]}, serving {self.fingerprint[:12]}"
        if manifest["mode"] == "full":
            return "full fine-tuned bundle: it replaces the whole encoder and cannot share the base"
        if manifest["head"]["embed_dim"] != self.embed_dim:
            return f"head expects embed_dim {manifest['head']['embed_dim']}, base has {self.embed_dim}"
        lora = manifest.get("lora")
        if lora:
            if lora["rank"] > self.limits.r_max:
                return f"rank {lora['rank']} exceeds this server's r_max {self.limits.r_max}"
            if missing := set(lora.get("targets") or []) - set(self.limits.targets):
                return f"targets {sorted(missing)} are not enabled on this server (targets: {list(self.limits.targets)})"
        return None
