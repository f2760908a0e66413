"""Building the redis-py client for `budgetStore.url`, and counting what is sent through it.

URLs (credentials never in them; they come from files under the credentials dir):

- `redis://host:port/db`, `rediss://host:port/db` (TLS; redis-py query options such as
  `?ssl_ca_certs=/path/ca.pem` pass through), `unix:///path/redis.sock?db=0`
- `redis+sentinel://host:port,host:port/<service_name>/<db>`: redis-py's Sentinel client,
  which follows failovers. `?ssl=true` speaks TLS to the master; `?sentinel_auth=true`
  also sends the credentials to the sentinels (off by default: sentinels often run without auth).
- `redis+cluster://host:port,host:port/`: redis-py's RedisCluster (`?ssl=true` for TLS).

The password and username files are read again whenever a connection is opened
(`RedisCredentials`, a redis-py credential provider), so a rotated Secret reaches
running sidecars without a restart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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


class RedisCredentials(CredentialProvider):
    """A Redis username and password, read again at every new connection (a rotated Secret needs no
    restart): from files, or a password given once (the operator's KUBETOLL_REDIS_PASSWORD). Never logged.

    Every caller builds one of these and passes it to `connect_redis`: the sidecar from the
    files of its mounted credentials Secret (`for_store`), the operator and the CLI from their
    own flags.
    """

    def __init__(
        self, username_file: Path | None = None, password_file: Path | None = None, password: str | None = None
    ) -> None:
        self._user = username_file
        self._password_file = password_file
        self._password = password

    @classmethod
    def for_store(cls, settings: BudgetStoreSettings, credentials_dir: str) -> RedisCredentials | None:
        """The budget store's files under the mounted credentials Secret (None when it names none)."""
        if not (settings.username_file or settings.password_file):
            return None
        return cls(
            _inside(credentials_dir, settings.username_file) if settings.username_file else None,
            _inside(credentials_dir, settings.password_file) if settings.password_file else None,
        )

    @property
    def configured(self) -> bool:
        return bool(self._user or self._password_file or self._password)

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._password or ""
        if self._password_file is not None:
            password = _read(self._password_file)
        if self._user is not None:
            return (_read(self._user), password)
        return (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def password_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """KUBETOLL_REDIS_PASSWORD, if set (a command-line flag would show in `ps`)."""
    return (env if env is not None else os.environ).get("KUBETOLL_REDIS_PASSWORD") or None


def _inside(base: str, name: str) -> Path:
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
    credentials: RedisCredentials | None,
    *,
    io_timeout: float | None = None,
    decode_responses: bool = True,
    client_name: str = "kubetoll-sidecar",
) -> Redis | RedisCluster:
    """The redis-py asyncio client for the settings (no I/O happens here).

    Retries are off: the store decides what to do when Redis does not answer,
    and a retry inside redis-py would only stretch a request's wait. The cache
    asks for `decode_responses=False` (it stores binary vectors). Every caller
    (sidecar, operator, `kubetoll report`, `kubetoll cache flush`) opens its client
    here, so each speaks TLS, Sentinel and Cluster the same way.
    """
    if not settings.url:
        raise ValueError("budgetStore.url is not set")
    timeout = io_timeout if io_timeout is not None else max(0.5, 5 * settings.timeout_ms / 1000.0)
    creds = credentials if credentials is not None and credentials.configured else None
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
