"""The adapter registry: a folder of bundles, watched for changes, with per-version status.

  python -m serving.registry push BUNDLE_FOLDER [--registry adapters] [--name NAME]
  python -m serving.registry list [--registry adapters] [--base ...]
  python -m serving.registry remove NAME[@VERSION] [--registry adapters]

A version exists once its manifest.json is present and valid; a folder without one (a copy in
progress) is invisible. Versions whose manifest cannot serve on this base are listed as refused,
with the reason, and every other adapter keeps serving.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from modeling import bundle as bundles


def listing_view(manifest: dict) -> dict:
    """The manifest fields that listing and answering read. Thousands of versions stay listed, so
    entries keep only these, with repeated strings shared; a load re-reads the whole manifest."""
    lora, output = manifest.get("lora") or {}, manifest["output"]
    return {"task": sys.intern(manifest["task"]), "mode": sys.intern(manifest["mode"]),
            "output": {"kind": sys.intern(output["kind"]), "labels": tuple(map(sys.intern, output["labels"]))},
            "lora": {"rank": lora.get("rank")} if lora else None,
            "base": {"fingerprint": sys.intern(manifest["base"]["fingerprint"])},
            "metrics": manifest.get("metrics") or {}}


class AdapterNotFound(LookupError):
    pass


class AdapterRefused(RuntimeError):
    pass


class RegistryUnavailable(RuntimeError):
    """The registry volume cannot be read right now (transient: UNAVAILABLE, not a refusal)."""


@dataclass
class Entry:
    name: str
    version: int
    folder: Path
    manifest: dict | None
    reason: str | None = None  # None = servable (so far: checksums are verified at load)
    stamp: float = field(default=0.0, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def status(self) -> str:
        return "refused" if self.reason else "ok"

    def summary(self) -> dict:
        m = self.manifest or {}
        return {"name": self.name, "version": self.version, "status": self.status,
                "reason": self.reason, "task": m.get("task"), "mode": m.get("mode"),
                "kind": (m.get("output") or {}).get("kind"), "labels": list((m.get("output") or {}).get("labels") or ()),
                "rank": (m.get("lora") or {}).get("rank"),
                "base_fingerprint": (m.get("base") or {}).get("fingerprint"),
                "metrics": {split: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                            for split, r in (m.get("metrics") or {}).items()}}


class Registry:
    """Scans `root`; `check(manifest) -> reason | None` decides what this server can serve."""

    def __init__(self, root: Path, check=None):
        self.root = Path(root)
        self.check = check or (lambda manifest: None)
        self._entries: dict[str, Entry] = {}
        # name -> {version: entry}: a request resolves its name in constant time, not by a scan of
        # every entry (with thousands registered, that scan was the host's largest cost per request)
        self._versions: dict[str, dict[int, Entry]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners = []
        self.problem: str | None = None  # why the last scan failed, if it did
        self.refresh()

    def readable(self) -> bool:
        """Whether the folder is there (a file missing at load time then means the volume, not the bundle)."""
        return self.root.is_dir()

    def refresh(self) -> tuple[set[str], set[str]]:
        """Rescan; returns (added refs, removed refs). If the folder cannot be read (a volume gone
        or failing), everything listed stays listed and `problem` says why: what is loaded keeps
        serving, and a volume that comes back is picked up by the next scan."""
        found: dict[str, Entry] = {}
        try:
            if not self.readable():
                raise FileNotFoundError(f"registry folder {self.root} does not exist")
            for name_dir in self.root.iterdir():
                if name_dir.name.startswith(".") or not name_dir.is_dir():
                    continue
                try:
                    bundles.validate_name(name_dir.name)
                except bundles.BundleError:
                    continue
                for vdir in name_dir.iterdir():
                    if not vdir.name.isdigit():
                        continue
                    entry = self._entry(name_dir.name, int(vdir.name), vdir)
                    if entry is not None:
                        found[entry.ref] = entry
        except OSError as exc:
            self.problem = f"registry unreadable: {exc}"
            return set(), set()
        self.problem = None
        versions: dict[str, dict[int, Entry]] = {}
        for entry in found.values():
            versions.setdefault(entry.name, {})[entry.version] = entry
        with self._lock:
            added = set(found) - set(self._entries)
            removed = set(self._entries) - set(found)
            self._entries, self._versions = found, versions
        for listener in self._listeners:
            listener(added, removed)
        return added, removed

    def _entry(self, name: str, version: int, folder: Path) -> Entry | None:
        manifest_path = folder / bundles.MANIFEST
        try:
            stamp = manifest_path.stat().st_mtime_ns
        except FileNotFoundError:
            return None  # still being copied: invisible
        try:
            bundles.refuse_symlinks(folder.parent, folder)
        except bundles.BundleError as exc:  # listed (so an operator sees why), never read
            return Entry(name, version, folder, None, str(exc), stamp)
        ref = f"{name}@{version}"
        old = self._entries.get(ref)
        if old is not None and old.stamp == stamp:
            return old
        try:
            manifest = bundles.read_manifest(folder)
            reason = self.check(manifest)
        except bundles.BundleError as exc:
            manifest, reason = None, str(exc)
        if manifest is not None:
            manifest = listing_view(manifest)
        return Entry(name, version, folder, manifest, reason, stamp)

    def mark_refused(self, ref: str, reason: str) -> None:
        with self._lock:
            if ref in self._entries:
                self._entries[ref].reason = reason

    def __len__(self) -> int:
        return len(self._entries)  # a count for gauges, without sorting

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (e.name, e.version))

    def resolve(self, ref: str) -> Entry:
        """NAME (newest version) or NAME@VERSION -> Entry; raises BundleError for a bad name."""
        name, version = bundles.parse_ref(ref)
        with self._lock:
            versions = self._versions.get(name, {})
        if version is None and versions:
            version = max(versions)
        entry = versions.get(version)
        if entry is None:
            raise AdapterNotFound(f"adapter {ref!r} not found in the registry")
        if entry.reason:
            raise AdapterRefused(f"adapter {entry.ref} refused: {entry.reason}")
        return entry

    def on_change(self, listener) -> None:
        self._listeners.append(listener)

    def watch(self, interval: float = 0.5) -> threading.Thread:
        """Poll in the background (portable; a scan of a few thousand folders takes milliseconds)."""
        def loop():
            while not self._stop.wait(interval):
                self.refresh()
        thread = threading.Thread(target=loop, name="registry-watch", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._stop.set()


def push(bundle_folder: Path, registry: Path, name: str | None = None) -> Path:
    """Verify a bundle, copy it into the registry's staging area, publish atomically."""
    source = bundles.read_bundle(Path(bundle_folder))  # checksums verified before copying
    name = name or source.manifest.get("name")
    if not name:
        raise bundles.BundleError(f"{bundle_folder}: its manifest has no name; pass --name")
    staged = bundles.staging_dir(registry)
    try:
        for fname in [*source.manifest["files"], bundles.MANIFEST]:
            shutil.copy2(Path(bundle_folder) / fname, staged / fname)
        return bundles.publish(staged, registry, name)
    finally:
        bundles.discard(staged)


def remove(ref: str, registry: Path) -> list[Path]:
    """Remove NAME (every version) or NAME@VERSION: renamed away first, so readers see it vanish at once."""
    name, version = bundles.parse_ref(ref)
    available = bundles.versions(registry, name)
    targets = available if version is None else [v for v in available if v == version]
    if not targets:
        raise AdapterNotFound(f"adapter {ref!r} not found in {registry}")
    removed = []
    for v in targets:
        folder = Path(registry) / name / str(v)
        trash = bundles.staging_dir(registry)
        (folder).rename(trash / "removed")
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(folder)
    if version is None or not bundles.versions(registry, name):
        shutil.rmtree(Path(registry) / name, ignore_errors=True)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_push = sub.add_parser("push", help="publish a bundle folder as a new version")
    p_push.add_argument("bundle")
    p_push.add_argument("--name")
    p_list = sub.add_parser("list", help="name, versions, task, rank, fingerprint, metrics, status")
    p_list.add_argument("--base", help="check fingerprints against this base (default: the default base)")
    p_list.add_argument("--json", action="store_true")
    p_rm = sub.add_parser("remove", help="remove NAME or NAME@VERSION")
    p_rm.add_argument("ref")
    for p in (p_push, p_list, p_rm):
        p.add_argument("--registry", default="adapters")
    args = parser.parse_args(argv)
    registry = Path(args.registry)
    try:
        if args.command == "push":
            print(f"published {push(Path(args.bundle), registry, args.name)}")
        elif args.command == "remove":
            for folder in remove(args.ref, registry):
                print(f"removed {folder}")
        else:
            from modeling.base import load_base
            from serving.engine import manifest_checker
            base = load_base(args.base)
            rows = [e.summary() for e in Registry(registry, manifest_checker(base)).entries()]
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in rows if not args.json else []:
                metrics = " ".join(f"{s}:{k}={v:.3f}" for s, r in row["metrics"].items()
                                   for k, v in r.items() if k in ("q3", "q8", "accuracy", "spearman"))
                print(f"{row['name']}@{row['version']:<4} {row['status']:<8} task={row['task']} "
                      f"rank={row['rank']} base={str(row['base_fingerprint'])[:12]} {metrics}"
                      + (f"  reason: {row['reason']}" if row["reason"] else ""))
    except (bundles.BundleError, AdapterNotFound, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
