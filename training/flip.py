"""FLIP's split zips (`--data-dir flip:TASK[/SPLIT]`): the vendored ones, or downloaded once into a
cache from FLIP's public repository at a pinned commit and checked against git's blob id there.

Offline, a zip that is neither vendored nor cached fails at once, naming the file to download and
where to put it. The cache is $ESM_ADAPTERS_CACHE (default ~/.cache/esm-adapters)/flip/TASK/splits.zip.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from pathlib import Path

from training.tasks import DATASETS

log = logging.getLogger(__name__)

COMMIT = "62cace8735f5"
URL = "https://github.com/J-SNACKKB/FLIP/raw/{commit}/splits/{task}/splits.zip"
# git's blob id (`git hash-object`) of splits/<task>/splits.zip at COMMIT (../shared/data/README.md)
BLOB_IDS = {
    "aav": "f7a2daee64e0ce9d0de6047fc5fb073f57603dd3",
    "bind": "59849f17502c63b5cfd4d138684f1a9e9f1b29bb",
    "conservation": "0fc0bb8be21b3454c8a628ec1c26133acc3b8925",
    "gb1": "5086ae0e4a5f397672feb39b04d71fe8f5d34ae9",
    "meltome": "94b82305ccf0ca8a979771ae6edfd27824fdf2d4",
    "sav": "071362f3e1d9d438bcec7a58dae3948a81cb3caa",
    "scl": "a2db6c2b23db4497625fd350354592dad1b3ce71",
    "secondary_structure": "858054a3ee8a214bbbdccca03e1165f648ee6eb1",
}
VENDORED = {"bind": DATASETS / "bind" / "flip_bind_splits.zip",
            "conservation": DATASETS / "conservation" / "flip_conservation_splits.zip",
            "secondary_structure": DATASETS / "sec_str" / "flip_secondary_structure_splits.zip"}


class FlipError(ValueError):
    pass


def parse(spec: str) -> tuple[str, str | None]:
    """'flip:TASK[/SPLIT]' -> (TASK, SPLIT or None)."""
    task, _, split = spec.removeprefix("flip:").partition("/")
    if task not in BLOB_IDS:
        raise FlipError(f"{spec}: FLIP has no task {task!r}; FLIP tasks: {', '.join(sorted(BLOB_IDS))}")
    return task, split or None


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_path(task: str) -> Path:
    root = Path(os.environ.get("ESM_ADAPTERS_CACHE") or Path.home() / ".cache" / "esm-adapters")
    return root / "flip" / task / "splits.zip"


def url(task: str) -> str:
    return os.environ.get("ESM_ADAPTERS_FLIP_URL", URL).format(commit=COMMIT, task=task)


def checked(path: Path, task: str) -> Path:
    if (found := git_blob_id(path)) != BLOB_IDS[task]:
        raise FlipError(f"{path}: git blob id {found}, expected {BLOB_IDS[task]} (FLIP {task} at commit "
                        f"{COMMIT}); the file is damaged or another version: delete it and download again "
                        f"from {url(task)}")
    return path


def locate(task: str, timeout: float = 30.0) -> Path:
    """The split zip of a FLIP task: vendored, cached, or downloaded into the cache now."""
    if task in VENDORED:
        return checked(VENDORED[task], task)
    target = cache_path(task)
    if target.exists():
        return checked(target, task)
    how = (f"download {url(task)} and put it at {target} (or set ESM_ADAPTERS_CACHE), or pass your own "
           f"files with --data-dir / --train --val --test")
    if os.environ.get("ESM_ADAPTERS_OFFLINE"):
        raise FlipError(f"FLIP {task}: not cached and ESM_ADAPTERS_OFFLINE is set; {how}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".zip.partial")
    try:
        log.info("downloading %s", url(task))
        with urllib.request.urlopen(url(task), timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        checked(partial, task)
    except (OSError, FlipError) as exc:
        partial.unlink(missing_ok=True)
        raise FlipError(f"FLIP {task}: could not download ({exc}); {how}") from exc
    partial.rename(target)
    return target
