"""Optional bearer-token authentication on every RPC.

The token comes from a file (ServiceConfig.auth_token_file, or the file named by
ESM_ADAPTERS_AUTH_TOKEN_FILE, which is how the Helm chart mounts its secret) or from the
environment variable ESM_ADAPTERS_AUTH_TOKEN. Clients send the metadata
`authorization: Bearer <token>`. The file is re-read when it changes, so a rotated secret takes
effect without a restart. No token configured = no authentication (the local demo).
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from esm_adapters.client import TOKEN_ENV, TOKEN_FILE_ENV  # one name for the service and its clients


class Unauthenticated(Exception):
    pass


class TokenCheck:
    def __init__(self, token_file: str | None = None):
        path = token_file or os.environ.get(TOKEN_FILE_ENV)
        self.path = Path(path) if path else None
        self._fixed = None if self.path else os.environ.get(TOKEN_ENV) or None
        self._stamp: int | None = None
        self._token = self._fixed.encode() if self._fixed else b""
        self.enabled = self.path is not None or self._fixed is not None
        if self.enabled:
            self.token()  # a missing or empty token fails at start, not on the first request

    def token(self) -> bytes:
        if self.path is not None:
            try:
                stamp = self.path.stat().st_mtime_ns
            except OSError as exc:
                raise ValueError(f"auth token file {self.path}: {exc.strerror}") from exc
            if stamp != self._stamp:
                token = self.path.read_bytes().strip()
                if not token:
                    raise ValueError(f"auth token file {self.path} is empty")
                self._token, self._stamp = token, stamp
        return self._token

    def check(self, metadata) -> None:
        """Raise Unauthenticated unless the call carries the expected bearer token."""
        if not self.enabled:
            return
        sent = next((value for key, value in metadata or () if key == "authorization"), "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if not hmac.compare_digest(sent, b"Bearer " + self.token()):
            raise Unauthenticated("missing or wrong bearer token (send metadata 'authorization: Bearer <token>')")
