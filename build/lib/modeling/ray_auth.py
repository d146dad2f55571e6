"""The embedded Ray's control plane, closed: every entry point that starts or joins Ray uses this
(serving.serve, serving.batch, training.fit --ray-workers), so it lives with what training and
serving share.

Anyone who can talk to Ray can run code as the service (Ray's security docs; CVE-2023-48022,
"ShadowRay"). So a local start:
- turns Ray's token authentication on (RAY_AUTH_MODE=token) with a token made for this start, in a
  file only this user can read (a private temporary folder), or the user's own: a file named by
  --ray-token-file / $ESM_ADAPTERS_RAY_TOKEN_FILE, or Ray's own $RAY_AUTH_TOKEN[_PATH]. The token
  is never logged, and it is not the gRPC bearer token (serving.auth): that one guards Predict,
  this one guards Ray;
- puts every Ray port on loopback: Ray's node address becomes 127.0.0.1 (Ray's own single-machine
  mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), so GCS, raylet, workers, agents, the dashboard head
  and their metrics servers bind 127.0.0.1 instead of every interface. A local user can still
  reach those ports; the token is what refuses them.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
TOKEN_FILE_ENV = "ESM_ADAPTERS_RAY_TOKEN_FILE"


SETTINGS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


@dataclass
class RayToken:
    source: str  # "generated", "file" or "environment": what the logs may say, never the token
    path: Path | None = None
    folder: Path | None = None  # the private folder of a generated token, removed at close
    previous: dict | None = None  # the settings before, put back at close

    def close(self) -> None:
        """After Ray stopped: the process's settings as they were, a generated token deleted."""
        if self.previous is not None:
            for key, value in self.previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _refresh_ray_process_state()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def private_token_file(path: Path) -> Path:
    """A token file must exist, hold a token and be readable by its owner only."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"Ray token file {path}: {exc.strerror}") from exc
    if not text:
        raise ValueError(f"Ray token file {path} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"Ray token file {path} is readable by others (mode {stat.filemode(mode)}): chmod 600 it")
    return path


def generate() -> RayToken:
    folder = Path(tempfile.mkdtemp(prefix="esm-adapters-ray-token-"))  # 0700
    path = folder / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return RayToken("generated", path, folder)


def close_control_plane(token_file: str | None = None) -> RayToken:
    """Set this process (and the Ray processes it starts) up for a token-authenticated,
    loopback-only local Ray; call before ray.init. Returns where the token came from."""
    previous = {key: os.environ.get(key) for key in SETTINGS}
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV)
    if token_file:
        token = RayToken("file", private_token_file(Path(token_file)))
    elif os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = RayToken("environment")  # Ray reads it itself
    else:
        token = generate()
    if token.path is not None:
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token.path)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's node address: loopback
    token.previous = previous
    _refresh_ray_process_state()
    log.info("Ray token authentication on (token: %s), Ray ports on loopback", token.source)
    return token


def _refresh_ray_process_state() -> None:
    """Ray reads these settings once per process (at import, and the token once); a process that
    imported Ray before, or started another service before, must see the new ones. Ray 2.60's
    internals: kept here, in one place."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    ray_constants.ENABLE_RAY_CLUSTER = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1") not in ("0", "false")
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def join_cluster(token_file: str | None = None) -> RayToken:
    """For a driver joining a running cluster: that cluster's token, from --ray-token-file, or
    $ESM_ADAPTERS_RAY_TOKEN_FILE, or Ray's own variables (the cluster refuses a driver without it)."""
    previous = {key: os.environ.get(key) for key in SETTINGS}
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV)
    if token_file:
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(private_token_file(Path(token_file)))
    if token_file or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_MODE"] = "token"
    _refresh_ray_process_state()
    return RayToken("file" if token_file else "environment", previous=previous)


def init_ray(address: str | None = None, token_file: str | None = None, **init_kwargs) -> RayToken:
    """ray.init for every entry point: a new local Ray closed as above, or a running cluster joined
    with its token. Close the returned token after ray.shutdown()."""
    import ray

    token = join_cluster(token_file) if address else close_control_plane(token_file)
    try:
        ray.init(address=address, **init_kwargs)
    except BaseException:
        token.close()
        raise
    return token
