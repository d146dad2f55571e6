"""The registry as one server sees it: the folder polled for changes, and each version's status.

A version is listed once its manifest.json is there (a folder without one is a copy in progress).
Every entry is checked on its own (folder rules in modeling/registry.py, the manifest's schema in
modeling/bundle.py, then what this server can serve): a bad entry is listed as refused, with the
reason, and never stops the scan, hides another entry or fails a request that named another.

A version's life, as this server sees it:
- arriving: listed but never loaded completely. Any change to any of its files (size or mtime)
  makes the next scan look at it afresh, so a copy whose manifest landed before its weights becomes
  servable once the weights land, and a refusal (a missing file, a checksum) is retried then.
- sealed: loaded completely once. Its identity (the sha256 of its manifest, which lists every
  file's sha256) is fixed from then on: a later change to a file it serves is an in-place edit, and
  the version is refused, naming the file (to change an adapter, push a new version).
- gone: its folder was removed. Whatever was cached for it is dropped (the `on_change` listeners).
"""
from __future__ import annotations

import hashlib
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from modeling import bundle as bundles
from modeling import registry as store

log = logging.getLogger(__name__)
EDITED = "edited in place"
MAX_METRICS = 64  # per split, in the listing (a manifest may hold more; the listing keeps numbers only)


class AdapterNotFound(LookupError):
    pass


class AdapterRefused(RuntimeError):
    pass


class RegistryUnavailable(RuntimeError):
    """The registry volume cannot be read right now (transient: UNAVAILABLE, not a refusal)."""


def listing_view(manifest: dict) -> dict:
    """The manifest fields that listing and answering read. Thousands of versions stay listed, so
    entries keep only these, with repeated strings shared; a load re-reads the whole manifest."""
    lora, output = manifest.get("lora") or {}, manifest["output"]
    metrics = {}
    for split, values in list((manifest.get("metrics") or {}).items())[:MAX_METRICS]:
        numbers = {k: float(v) for k, v in list(values.items())[:MAX_METRICS]
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   and abs(v) < 1e300}
        metrics[str(split)[:64]] = {str(k)[:64]: v for k, v in numbers.items()}
    return {"task": sys.intern(manifest["task"]), "mode": sys.intern(manifest["mode"]),
            "output": {"kind": sys.intern(output["kind"]), "labels": tuple(map(sys.intern, output["labels"]))},
            "lora": {"rank": lora.get("rank")} if lora else None,
            "base": {"fingerprint": sys.intern(manifest["base"]["fingerprint"])},
            "metrics": metrics, "files": dict(manifest["files"])}


@dataclass
class Entry:
    name: str
    version: int
    folder: Path
    manifest: dict | None  # listing_view of the manifest; None if it could not be read
    identity: str | None = None  # sha256 of the manifest's bytes
    reason: str | None = None  # None = servable (so far: the files are verified at load)
    stamps: dict = field(default_factory=dict, repr=False)  # file -> (size, mtime_ns, is a link)
    sealed: bool = False  # loaded completely once: identity and served files fixed from then on

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def key(self) -> str:
        """What caches key on: the ref and the content identity (the same ref with other bytes is
        another adapter)."""
        return f"{self.ref}#{self.identity}"

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
                "metrics": m.get("metrics") or {}}


@dataclass
class ScanHealth:
    last_ok: float = 0.0  # unix time of the last complete scan (0: none yet)
    scans: int = 0
    errors: int = 0  # scans that failed: the folder unreadable, or anything else
    last_error: str | None = None
    skipped: list[str] = field(default_factory=list)  # folders that are not versions, and why


class Registry:
    """Scans `root`; `rule(manifest) -> reason | None` decides what this server can serve
    (modeling.registry.ServeRule). Listeners hear `on_change(retired keys)`: the keys of versions
    that were servable and no longer are (removed, edited, refused)."""

    def __init__(self, root: Path, rule=None):
        self.root = Path(root)
        self.rule = rule or (lambda manifest: None)
        self._entries: dict[str, Entry] = {}
        # name -> {version: entry}: a request resolves its name in constant time, not by a scan of
        # every entry (with thousands registered, that scan was the host's largest cost per request)
        self._versions: dict[str, dict[int, Entry]] = {}
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()  # one scan at a time (the watch thread and callers)
        self._stop = threading.Event()
        self._listeners = []
        self.health = ScanHealth()
        self.problem: str | None = None  # why the registry cannot be read now, if it cannot
        self.refresh()

    def readable(self) -> bool:
        """Whether the folder is there (a file missing at load time then means the volume, not the bundle)."""
        return self.root.is_dir()

    def refresh(self) -> set[str]:
        """Rescan; returns the retired keys. Never raises: a folder that cannot be read keeps
        everything listed (what is loaded keeps serving; a volume that comes back is picked up by
        the next scan) and `problem` says why; any other failure is counted in `health`."""
        with self._scan_lock:
            self.health.scans += 1
            try:
                return self._scan()
            except Exception as exc:  # the scan must survive anything an entry or the disk does
                self.health.errors += 1
                self.health.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception("registry scan failed")
                return set()

    def _scan(self) -> set[str]:
        try:
            if not self.readable():
                raise FileNotFoundError(f"registry folder {self.root} does not exist")
            found, skipped = store.walk(self.root)
        except OSError as exc:
            self.problem = f"registry unreadable: {exc}"
            self.health.errors += 1
            self.health.last_error = self.problem
            return set()
        entries: dict[str, Entry] = {}
        for version_folder in found:
            try:
                entry = self._entry(version_folder)
            except Exception as exc:  # anything at all: this entry is refused, the scan goes on
                entry = Entry(version_folder.name, version_folder.version, version_folder.folder, None,
                              reason=f"cannot be read: {type(exc).__name__}: {str(exc)[:200]}")
            if entry is not None:
                entries[entry.ref] = entry
        versions: dict[str, dict[int, Entry]] = {}
        for entry in entries.values():
            versions.setdefault(entry.name, {})[entry.version] = entry
        with self._lock:
            before = {e.key for e in self._entries.values() if not e.reason}
            self._entries, self._versions = entries, versions
            retired = before - {e.key for e in entries.values() if not e.reason}
        self.problem = None
        self.health.last_ok, self.health.skipped = time.time(), skipped[:100]
        self._notify(retired)
        return retired

    def _notify(self, retired: set[str]) -> None:
        if not retired:
            return
        for listener in self._listeners:
            try:
                listener(retired)
            except Exception:  # a listener's bug must not stop the scans
                self.health.errors += 1
                log.exception("registry listener failed")

    def _entry(self, found: store.VersionFolder) -> Entry | None:
        name, version, folder = found.name, found.version, found.folder
        if folder.is_symlink():  # listed (so an operator sees why), never read
            return Entry(name, version, folder, None, reason=f"{folder} is a symlink; bundles must hold real "
                         "files and folders")
        try:
            stamps = store.file_stamps(folder)
        except FileNotFoundError:
            return None  # removed while scanning
        if bundles.MANIFEST not in stamps:
            return None  # still being copied: invisible
        old = self._entries.get(found.ref)
        if old is not None and old.stamps == stamps:
            return old
        if old is not None and old.sealed:
            return self._after_edit(old, stamps)
        try:
            data = bundles.read_manifest_bytes(folder)
            manifest = bundles.parse_manifest(data, folder)
            reason = self.rule(manifest)
            view, identity = listing_view(manifest), bundles.identity_of(data)
        except bundles.BundleError as exc:
            view, identity, reason = None, None, str(exc)
        return Entry(name, version, folder, view, identity, reason, stamps)

    def _after_edit(self, old: Entry, stamps: dict) -> Entry:
        """A sealed version whose files changed: refused, naming the first file whose bytes differ
        from what it was published with; the same bytes written again (a repeated copy) are no edit."""
        entry = Entry(old.name, old.version, old.folder, old.manifest, old.identity, old.reason, stamps, sealed=True)
        if old.reason and old.reason.startswith(EDITED):
            return entry  # refused for good; the first file found changed stays named
        edited = changed_file(old, stamps)
        if edited:
            entry.reason = (f"{EDITED}: {edited} changed after {old.ref} was published and served; "
                            f"published versions are immutable (push a new version to change an adapter)")
            log.warning("adapter %s refused: %s", old.ref, entry.reason)
        return entry

    # ---- what the engine tells the registry --------------------------------------------------
    def seal(self, entry: Entry, stamps: dict) -> None:
        """The engine loaded `entry` completely from files with these stamps: fix its identity."""
        with self._lock:
            current = self._entries.get(entry.ref)
            if current is not None and current.identity == entry.identity and not current.reason:
                current.sealed, current.stamps = True, stamps

    def mark_refused(self, entry: Entry, reason: str) -> None:
        """A load of `entry` failed: refused until its files change (arriving) or for good (sealed)."""
        with self._lock:
            current = self._entries.get(entry.ref)
            if current is not None and current.identity == entry.identity:
                current.reason = reason
        self._notify({entry.key})

    # ---- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)  # a count for gauges, without sorting

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (e.name, e.version))

    def resolve(self, ref: str) -> Entry:
        """NAME (newest version) or NAME@VERSION -> Entry; raises BundleError for a bad name."""
        name, version = store.parse_ref(ref)
        with self._lock:
            versions = self._versions.get(name, {})
        entry = versions.get(store.pick(versions, version))
        if entry is None:
            raise AdapterNotFound(f"adapter {ref!r} not found in the registry")
        if entry.reason:
            raise AdapterRefused(f"adapter {entry.ref} refused: {entry.reason}")
        return entry

    def is_current(self, key: str) -> bool:
        """Whether `key` is still a servable version (not removed, edited or refused since)."""
        ref = key.partition("#")[0]
        with self._lock:
            entry = self._entries.get(ref)
        return entry is not None and entry.key == key and not entry.reason

    def on_change(self, listener) -> None:
        self._listeners.append(listener)

    def watch(self, interval: float = 0.5) -> threading.Thread:
        """Poll in the background (portable; a scan of a few thousand folders takes milliseconds).
        The loop cannot die: refresh() never raises."""
        def loop():
            while not self._stop.wait(interval):
                self.refresh()
        thread = threading.Thread(target=loop, name="registry-watch", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._stop.set()


def changed_file(entry: Entry, stamps: dict) -> str | None:
    """The first file `entry` serves whose bytes are no longer what its manifest says, or None."""
    files = (entry.manifest or {}).get("files", {})
    touched = sorted(name for name in set(stamps) | set(entry.stamps) if stamps.get(name) != entry.stamps.get(name))
    for name in touched:
        path = entry.folder / name
        if name == bundles.MANIFEST:
            try:
                same = bundles.identity_of(bundles.read_manifest_bytes(entry.folder)) == entry.identity
            except (OSError, bundles.BundleError):
                same = False
        elif name in files:
            try:
                same = not path.is_symlink() and hashlib.sha256(path.read_bytes()).hexdigest() == files[name]
            except OSError:
                same = False
        else:
            continue  # not served: a stray file does not change the adapter
        if not same:
            return name
    return None
