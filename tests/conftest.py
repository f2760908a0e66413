from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import trustme
from redis.asyncio import Redis

from kubetoll_sidecar import tokens
from kubetoll_sidecar.cache import CacheStage
from kubetoll_sidecar.cache.embeddings import EmbeddingServer, HashedEmbedder
from kubetoll_tools.simulator import SimSettings, SimulatedUpstream
from support.cache_stage import FakeClock
from support.harness import RunningSidecar
from support.ports import reserved_port
from support.redis_server import private_or_shared_redis

os.environ.setdefault("KT_TEST_OPENAI_KEY", "sk-test-openai-key-123")
os.environ.setdefault("KT_TEST_ANTHROPIC_KEY", "sk-ant-test-key-456")


@pytest.fixture
async def sim():
    async with SimulatedUpstream(SimSettings(api_key=os.environ["KT_TEST_OPENAI_KEY"])) as s:
        yield s


@pytest.fixture
async def sim2():
    """A second provider, for fallback tests."""
    async with SimulatedUpstream(SimSettings(api_key=os.environ["KT_TEST_OPENAI_KEY"])) as s:
        yield s


@pytest.fixture
async def start_sidecar(tmp_path):
    started: list[RunningSidecar] = []

    async def _start(config, clock=None, store=None, monotonic=time.monotonic) -> RunningSidecar:
        # Each sidecar its own config file: one watches its file, and a second one written over it
        # would reload the first with the second's ports.
        where = tmp_path if not started else tmp_path / f"sidecar-{len(started)}"
        where.mkdir(exist_ok=True)
        sc = RunningSidecar(where, config, clock=clock, store=store, monotonic=monotonic)
        started.append(sc)
        return await sc.start()

    yield _start
    for sc in started:
        await sc.stop()


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="module")
def redis_url():
    """A real Redis: REDIS_URL when set, else a private redis-server for the module."""
    yield from private_or_shared_redis()


@pytest.fixture
async def r(redis_url):
    """A client with decoded responses, for reading what the code under test wrote."""
    c = Redis.from_url(redis_url, decode_responses=True)
    yield c
    await c.aclose()


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL: DATABASE_URL when set, else a private server for the session (support/postgres.py)."""
    from support.postgres import private_or_shared_postgres

    yield from private_or_shared_postgres()


@pytest.fixture
def ns():
    """A fresh namespace (key prefix) per test, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- the operator on kmock


@pytest.fixture
async def kubectl(kmock):
    """A client of kmock's Kubernetes emulator, with the project's resources registered."""
    import aiohttp

    from support.kopf_env import Kubectl, register_resources

    register_resources(kmock)
    async with aiohttp.ClientSession(base_url=str(kmock.url)) as session:
        yield Kubectl(session)


@pytest.fixture
async def start_operator(kmock, tmp_path, monkeypatch):
    """`await start_operator(**OperatorOptions)` runs the operator against kmock; all stop at teardown."""
    from support.kopf_env import OperatorThreads, use_kmock_kubeconfig

    use_kmock_kubeconfig(kmock, tmp_path, monkeypatch)
    operators = OperatorThreads()
    yield operators.start
    await operators.stop_all()


# --------------------------------------------------------------------------- webhook TLS


@pytest.fixture
def port() -> Iterator[int]:
    """The webhook's port, held for kopf's server until the test ends (support/ports.py, `reserved_port`)."""
    with reserved_port() as held:
        yield held


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_dir(ca: trustme.CA, tmp_path: Path) -> Path:
    """What the chart mounts from the webhook's TLS Secret (tls.crt, tls.key, ca.crt)."""
    d = tmp_path / "webhook-tls"
    d.mkdir()
    cert = ca.issue_cert("127.0.0.1", "localhost", "kubetoll-webhook.kubetoll-system.svc")
    (d / "tls.crt").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    (d / "tls.key").write_bytes(cert.private_key_pem.bytes())
    (d / "ca.crt").write_bytes(ca.cert_pem.bytes())
    return d


# --------------------------------------------------------------------------- the cache stage


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def embed_server():
    async with EmbeddingServer(HashedEmbedder().encode) as server:
        yield server


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def stages():
    made: list[CacheStage] = []

    def _make(ns: str, redis: Any, **kw: Any) -> CacheStage:
        kw.setdefault("redis_timeout", 0.5)  # a loaded CI machine must not turn hits into misses
        stage = CacheStage(ns, redis, **kw)
        made.append(stage)
        return stage

    yield _make
    for s in made:
        await s.close()


@pytest.fixture(autouse=True)
def _approximate_counting_reset() -> Iterator[None]:
    """A sidecar started in this process sets what approximate models are counted with
    (`tokens.use_encodings_for`, process-wide, as in its own process); the next test starts from the default."""
    yield
    tokens.use_encodings_for([])
