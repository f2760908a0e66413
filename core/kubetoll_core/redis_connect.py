"""Building the redis-py client for `budgetStore.url`, and counting what is sent through it.

URLs (credentials never in them; they come from files under the credentials dir):

- `redis://host:port/db`, `rediss://host:port/db` (TLS; redis-py query options such as
  `?ssl_ca_certs=/path/ca.pem` pass through), `unix:///path/redis.sock?db=0`
- `redis+sentinel://host:port,host:port/<service_name>/<db>`: redis-py's Sentinel client,
  which follows failovers. `?ssl=true` speaks TLS to the master; `?sentinel_auth=true`
  also sends the credentials to the sentinels (off by default: sentinels often run without auth).
- `redis+cluster://host:port,host:port/`: redis-py's RedisCluster (`?ssl=true` for TLS).

The password and username files are read again whenever a connection is opened
(a redis-py credential provider), so a rotated Secret reaches running sidecars
without a restart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider

from .router_config import BudgetStoreSettings


class FileCredentialProvider(CredentialProvider):
    """Username and password from files under the mounted credentials Secret, read per connection."""

    def __init__(self, credentials_dir: str, username_file: str | None, password_file: str | None) -> None:
        self._user = _resolve(credentials_dir, username_file) if username_file else None
        self._password = _resolve(credentials_dir, password_file) if password_file else None

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = _read(self._password) if self._password else ""
        if self._user:
            return (_read(self._user), password)
        return (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()

    @property
    def configured(self) -> bool:
        return bool(self._user or self._password)


def _resolve(base: str, name: str) -> Path:
    root = Path(base).resolve()
    p = (root / name).resolve()
    if root not in p.parents:
        raise ValueError(f"credential file {name!r} must be inside the credentials dir {base}")
    return p


def _read(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read Redis credential file {p}: {exc.strerror}") from None


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    out = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [v6]:port
            host, _, rest = part[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default_port
        else:
            host, _, port_s = part.rpartition(":") if ":" in part else (part, "", "")
            port = int(port_s) if port_s else default_port
        out.append((host, port))
    if not out:
        raise ValueError("the Redis URL names no host")
    return out


def _truthy(v: str | None) -> bool:
    return (v or "").lower() in ("1", "true", "yes", "on")


def connect_redis(
    settings: BudgetStoreSettings,
    credentials_dir: str,
    *,
    io_timeout: float | None = None,
    decode_responses: bool = True,
    credential_provider: CredentialProvider | None = None,
    client_name: str = "kubetoll-sidecar",
) -> Redis | RedisCluster:
    """The redis-py asyncio client for the settings (no I/O happens here).

    Retries are off: the store decides what to do when Redis does not answer,
    and a retry inside redis-py would only stretch a request's wait. The cache
    asks for `decode_responses=False` (it stores binary vectors). The operator
    passes its own `credential_provider` (its password comes from its own file or
    environment, not from a namespace's credentials Secret).
    """
    if not settings.url:
        raise ValueError("budgetStore.url is not set")
    timeout = io_timeout if io_timeout is not None else max(0.5, 5 * settings.timeout_ms / 1000.0)
    creds: CredentialProvider | None = credential_provider
    if creds is None:
        files = FileCredentialProvider(credentials_dir, settings.username_file, settings.password_file)
        creds = files if files.configured else None
    common: dict[str, Any] = dict(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=decode_responses,
        client_name=client_name,
    )
    if creds is not None:
        common["credential_provider"] = creds
    url = settings.url
    scheme = url.split("://", 1)[0]
    if scheme in ("redis", "rediss", "unix"):
        return Redis.from_url(url, **common)
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValueError("the Redis URL must not carry credentials")
    query = dict(parse_qsl(parts.query))
    ssl = _truthy(query.pop("ssl", None))
    if scheme == "redis+sentinel":
        path = [unquote(p) for p in parts.path.split("/") if p]
        if not path:
            raise ValueError(
                "redis+sentinel:// URL needs a service name: redis+sentinel://host:port,host:port/<service>/<db>"
            )
        service = path[0]
        db = int(path[1]) if len(path) > 1 else 0
        sentinel_kwargs: dict[str, Any] = dict(
            socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        if _truthy(query.pop("sentinel_auth", None)) and creds is not None:
            sentinel_kwargs["credential_provider"] = creds
        if ssl:
            common["ssl"] = True
        sentinel = Sentinel(_hosts(parts.netloc, 26379), sentinel_kwargs=sentinel_kwargs, **common)
        return sentinel.master_for(service, db=db)
    if scheme == "redis+cluster":
        nodes = [ClusterNode(h, p) for h, p in _hosts(parts.netloc, 6379)]
        kwargs = dict(common)
        kwargs.pop("client_name", None)
        if ssl:
            kwargs["ssl"] = True
        return RedisCluster(startup_nodes=nodes, **kwargs)
    raise ValueError(f"unsupported Redis URL scheme {scheme!r}")


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def default_sidecar_id() -> str:
    """Unique per process start: the pod name (HOSTNAME) plus pid and a random suffix."""
    host = os.environ.get("HOSTNAME") or os.uname().nodename
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in host)[:60] or "sidecar"
    return f"{safe}-{os.getpid()}-{os.urandom(3).hex()}"
