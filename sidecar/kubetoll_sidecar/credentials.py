"""API keys for backends: read from the mounted credentials Secret, or the environment.

The kubelet updates a mounted Secret in place when it rotates, so a file is
re-read when its modification time changes (checked at most once a second).
Keys are never logged and never leave this module except in an upstream
request's auth header.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kubetoll_core.router_config import Credential


class MissingCredential(Exception):
    """The backend's key is not where its config says. The message names where, never a value."""


class CredentialStore:
    RECHECK_SECONDS = 1.0

    def __init__(self, credentials_dir: str) -> None:
        self._dir = Path(credentials_dir)
        self._files: dict[str, tuple[float, float, str]] = {}  # name -> (checked_at, mtime, value)

    def get(self, cred: Credential | None) -> str | None:
        if cred is None:
            return None
        if cred.env is not None:
            value = os.environ.get(cred.env)
            if not value:
                raise MissingCredential(f"environment variable {cred.env} is not set")
            return value.strip()
        assert cred.file is not None
        now = time.monotonic()
        cached = self._files.get(cred.file)
        if cached and now - cached[0] < self.RECHECK_SECONDS:
            return cached[2]
        path = self._dir / cred.file
        try:
            mtime = path.stat().st_mtime
            if cached and cached[1] == mtime:
                self._files[cred.file] = (now, mtime, cached[2])
                return cached[2]
            value = path.read_text().strip()
        except OSError as exc:
            raise MissingCredential(
                f"credentials file {cred.file} is not readable in {self._dir}: {exc.strerror}"
            ) from None
        if not value:
            raise MissingCredential(f"credentials file {cred.file} in {self._dir} is empty")
        self._files[cred.file] = (now, mtime, value)
        return value
