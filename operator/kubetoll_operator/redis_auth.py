"""The budget store's credentials: read from the chart's Secret, handed to each namespace's sidecars.

The Secret (`redis.auth.existingSecret`) is mounted read-only into the operator pod
only, so the operator needs no RBAC on the release namespace's Secrets and no app
namespace can read it. Its keys (docs/install.md, "Redis with auth"):

- `password` and optionally `username`: the operator's own credential (the spend
  reader, the alert marks). With one password for everything (`requirepass`), every
  namespace gets this one too.
- with per-namespace ACL users (docs/redis-layout.md, "ACL"): `<namespace>.password`
  and optionally `<namespace>.username`, one pair per app namespace. Namespace names
  have no dot, so `<ns>.password` never collides with `password`, nor one namespace's
  keys with another's. A namespace without a pair gets no credential: never the
  operator's, never another namespace's.

What a namespace gets goes into its `kubetoll-credentials` Secret under `redis-username`
and `redis-password`, and its RouterConfig's `budgetStore` names those files. Backend
keys there are `<secret>_<key>` and always hold a `_`; these two hold none, so the
two never collide.

The files are read at every compile (a kubelet-updated Secret reaches the namespaces
on the next compile; `fingerprint` lets the operator notice a rotation) and never
logged: errors name a file, never its content.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from kubetoll_core.redis_connect import RedisCredentials
from kubetoll_core.router_config import BudgetStoreSettings

USERNAME_KEY = "redis-username"
PASSWORD_KEY = "redis-password"
OPERATOR_USERNAME = "username"
OPERATOR_PASSWORD = "password"


@dataclass(frozen=True)
class StoreCredential:
    """One Redis login; kept out of reprs so a logged object never shows it."""

    username: str | None = field(repr=False)
    password: str | None = field(repr=False)

    def secret_data(self) -> dict[str, str]:
        """The keys for `kubetoll-credentials` (base64, as Secret `data` holds them)."""
        out = {}
        for key, value in ((USERNAME_KEY, self.username), (PASSWORD_KEY, self.password)):
            if value:
                out[key] = base64.b64encode(value.encode()).decode()
        return out

    def store_settings(self, url: str) -> BudgetStoreSettings:
        """`budgetStore` naming the files the sidecar reads under its mounted credentials dir."""
        return BudgetStoreSettings(
            url=url,
            username_file=USERNAME_KEY if self.username else None,
            password_file=PASSWORD_KEY if self.password else None,
        )


@dataclass(frozen=True)
class RedisAuth:
    """The mounted Secret's directory and how to read it."""

    directory: Path
    per_namespace: bool = False

    def for_namespace(self, namespace: str) -> StoreCredential | None:
        """What `namespace`'s sidecars log in with; None when the Secret holds nothing for it."""
        if "." in namespace or "/" in namespace:  # not a namespace name: never read another key
            raise ValueError(f"{namespace!r} is not a namespace name")
        prefix = f"{namespace}." if self.per_namespace else ""
        username = self._read(prefix + OPERATOR_USERNAME)
        password = self._read(prefix + OPERATOR_PASSWORD)
        if not (username or password):
            return None
        return StoreCredential(username, password)

    def missing_keys(self, namespace: str) -> str:
        """The keys to add for a namespace that has none (for the operator's warning)."""
        prefix = f"{namespace}." if self.per_namespace else ""
        return f"{prefix}{OPERATOR_PASSWORD} (and optionally {prefix}{OPERATOR_USERNAME})"

    def operator_credentials(self) -> RedisCredentials:
        """The operator's own login, read again at every new connection (a rotation needs no restart)."""
        user = self.directory / OPERATOR_USERNAME
        password = self.directory / OPERATOR_PASSWORD
        return RedisCredentials(user if user.is_file() else None, password if password.is_file() else None)

    def fingerprint(self) -> str:
        """A hash of every key's content: it changes when the kubelet updates the mounted Secret."""
        digest = hashlib.sha256()
        # `..data` and the timestamped dirs are the kubelet's atomic-update machinery, not keys.
        try:
            names = sorted(p.name for p in self.directory.iterdir() if not p.name.startswith(".."))
        except OSError as exc:
            raise ValueError(f"cannot list the Redis credentials dir {self.directory}: {exc.strerror}") from None
        for name in names:
            digest.update(name.encode() + b"\0" + (self._read(name) or "").encode() + b"\0")
        return digest.hexdigest()

    def _read(self, name: str) -> str | None:
        path = self.directory / name
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValueError(f"cannot read Redis credential file {path}: {exc.strerror}") from None
