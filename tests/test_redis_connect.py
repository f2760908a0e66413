"""Connecting (TLS, AUTH from files, Sentinel, Cluster) and namespace isolation, on real servers."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from kubetoll_core.enums import OnExhausted
from kubetoll_core.kill_switch import set_suspended
from kubetoll_core.ledger_stream import period_totals, read_ledger
from kubetoll_core.redis_connect import RedisCredentials, connect_redis
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import BudgetStoreSettings
from kubetoll_core.spend_record import SpendRecord
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
from kubetoll_sidecar.budgets.store import Exhausted, Hold, Meter, StoreUnavailable
from kubetoll_sidecar.cache import keys as cache_keys
from kubetoll_sidecar.ledger_redis import RedisLedger
from support.harness import wait_until
from support.redis_server import ClusterRedis, RedisProcess, SentinelRedis, TlsRedis
from test_redis_auth import acl_args  # the line docs/redis-layout.md gives, parsed from the page

# These tests are not about timeouts: a generous one keeps a loaded machine from looking like
# a Redis outage (tests/test_redis_faults.py uses the 50 ms default on purpose).
SLOW_OK_MS = 1000.0

END = time.time() + 20 * 86400


def meter(budget: str = "b", limit: float = 10.0, key: str = "cap:usd:2026-11", fail_open: bool = True) -> Meter:
    return Meter(
        key=f"{budget}:{key}",
        kind="window",
        unit="usd",
        limit=limit,
        budget=budget,
        level="cap",
        label=budget,
        on_exhausted=OnExhausted.reject,
        period_end=END,
        fail_open=fail_open,
    )


def rec(ns: str, cost: float) -> SpendRecord:
    return SpendRecord(
        time=time.time(),
        namespace=ns,
        route="r",
        backend="x",
        tenant="t",
        tier="free",
        prompt_tokens=1,
        completion_tokens=1,
        cached_tokens=0,
        cost_usd=cost,
    )


async def round_trip(settings: BudgetStoreSettings, ns: str, creds: str = "/nonexistent") -> RedisBudgetStore:
    """Reserve and settle on two budgets, write a record, close: everything a sidecar does."""
    s = RedisBudgetStore.connect(settings, ns, creds, sidecar_id="a")
    await s.start()
    m1, m2 = meter("b1"), meter("b2")
    res = await s.reserve([Hold(m1, 1.0), Hold(m2, 1.0)], time.time())
    s.settle(res, {m1.key: 0.5, m2.key: 0.25}, time.time())
    RedisLedger(s, s.client).append(rec(ns, 0.5))
    await s.close()
    assert s.stats()["redis_errors"] == 0, s.stats()
    return s


async def check_totals(client, ns: str) -> None:
    totals = {t.budget: t.spent_units for t in await period_totals(client, ns)}
    assert totals == {"b1": 500_000_000, "b2": 250_000_000}
    records = await read_ledger(client, ns)
    assert [x.cost_usd for x in records] == [0.5]


# ---------------------------------------------------------------------- isolation


async def test_namespaces_never_share_budget_state(redis_url):
    ns_a, ns_b = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    a = RedisBudgetStore.connect(BudgetStoreSettings(url=redis_url, timeout_ms=SLOW_OK_MS), ns_a, "/x", sidecar_id="a")
    b = RedisBudgetStore.connect(
        BudgetStoreSettings(url=redis_url, timeout_ms=SLOW_OK_MS), ns_b, "/x", sidecar_id="a"
    )  # same sidecar id on purpose
    await a.start()
    await b.start()
    m = meter()
    res = await a.reserve([Hold(m, 10.0)], time.time())
    a.settle(res, {m.key: 10.0}, time.time())
    with pytest.raises(Exhausted):
        await a.reserve([Hold(m, 1.0)], time.time())
    res = await b.reserve([Hold(m, 10.0)], time.time())  # same budget and meter names, other namespace
    b.settle(res, {m.key: 3.0}, time.time())
    r = Redis.from_url(redis_url, decode_responses=True)
    try:
        await set_suspended(r, ns_a, "b", True)
        await asyncio.sleep(0.2)
        assert a.is_suspended("b") and not b.is_suspended("b")
        await a.close()
        await b.close()
        assert [t.spent for t in await period_totals(r, ns_a)] == [10.0]
        assert [t.spent for t in await period_totals(r, ns_b)] == [3.0]
        keys_a = [k async for k in r.scan_iter(match=f"kt:{{{ns_a}*")]
        keys_b = [k async for k in r.scan_iter(match=f"kt:{{{ns_b}*")]
        assert keys_a and keys_b and not set(keys_a) & set(keys_b)
        assert all(k.startswith((f"kt:{{{ns_a}}}:", f"kt:{{{ns_a}:")) for k in keys_a)
    finally:
        await r.aclose()


def test_keys_are_built_only_from_validated_names():
    k = RedisKeys("team-a")
    assert k.meter("support", meter("support").key).state == "kt:{team-a:support}:m:cap:usd:2026-11"
    assert k.suspended("support") == "kt:{team-a:support}:suspended"
    assert k.ledger() == "kt:{team-a}:ledger"
    for bad in ("Team", "a:b", "a}b", "a{b", "", "a*"):
        with pytest.raises(ValueError):
            RedisKeys(bad)
        with pytest.raises(ValueError):
            k.suspended(bad)
    with pytest.raises(ValueError):  # a meter whose key does not belong to its budget
        k.meter("support", "other:cap:usd:2026-11")


# ---------------------------------------------------------------------- credentials and ACL


def test_credentials_come_from_files_under_the_credentials_dir(tmp_path):
    (tmp_path / "user").write_text("kt-a\n")
    (tmp_path / "pw").write_text("first\n")
    p = RedisCredentials.for_store(BudgetStoreSettings(username_file="user", password_file="pw"), str(tmp_path))
    assert p is not None
    assert p.get_credentials() == ("kt-a", "first")
    (tmp_path / "pw").write_text("rotated")
    assert p.get_credentials() == ("kt-a", "rotated")  # read per connection: rotation needs no restart
    with pytest.raises(ValueError):
        RedisCredentials.for_store(BudgetStoreSettings(password_file="../etc/passwd"), str(tmp_path))
    with pytest.raises(ValueError):
        BudgetStoreSettings(url="redis://user:secret@localhost:6379/0")


async def test_acl_user_confined_to_its_namespace(tmp_path):
    proc = RedisProcess(args=("--requirepass", "admin-pw")).start()
    try:
        admin = Redis(port=proc.port, password="admin-pw", decode_responses=True)
        await admin.execute_command("ACL", "SETUSER", *acl_args("team-a", "pw-a"))
        (tmp_path / "user").write_text("kubetoll-team-a\n")
        (tmp_path / "password").write_text("pw-a\n")
        settings = BudgetStoreSettings(
            url=f"redis://127.0.0.1:{proc.port}/0",
            username_file="user",
            password_file="password",
            timeout_ms=SLOW_OK_MS,
        )
        await round_trip(settings, "team-a", str(tmp_path))
        await check_totals(admin, "team-a")
        # suspension and its message go through for its own namespace
        user = connect_redis(settings, RedisCredentials.for_store(settings, str(tmp_path)))
        await set_suspended(user, "team-a", "b1", True)
        # ... and nothing of another namespace can be read, written or published to
        with pytest.raises(NoPermissionError):
            await user.get(RedisKeys("team-b").suspended("b1"))
        with pytest.raises(NoPermissionError):
            await user.set("kt:{team-b:b1}:suspended", "1")
        with pytest.raises(NoPermissionError):
            await user.publish(RedisKeys("team-b").channel(), "x")
        with pytest.raises(NoPermissionError):  # SCAN ignores key patterns: it would list every namespace's keys
            await user.scan(match="kt:*")
        with pytest.raises(ResponseError):
            await user.flushall()
        await user.aclose()
        # the response cache works for its own namespace, with what CacheStage sends, and not for another's
        cache = connect_redis(settings, RedisCredentials.for_store(settings, str(tmp_path)), decode_responses=False)
        entry, log = cache_keys.entry_key("team-a", "faq", "g1", "h1"), cache_keys.log_key("team-a", "faq", "g1")
        pipe = cache.pipeline(transaction=False)
        pipe.set(entry, b"answer", ex=60)
        pipe.xadd(log, {b"id": b"h1"})
        pipe.expire(log, 60)
        await pipe.execute()
        assert await cache.mget([entry, cache_keys.epoch_key("team-a", "faq")]) == [b"answer", None]
        assert (await cache.xread({log: "0"}))[0][1][0][1] == {b"id": b"h1"}
        with pytest.raises(NoPermissionError):
            await cache.get(cache_keys.entry_key("team-b", "faq", "g1", "h1"))
        await cache.aclose()
        # a store configured for team-b with team-a's user cannot spend: its failClosed meters refuse
        b = RedisBudgetStore.connect(settings, "team-b", str(tmp_path), sidecar_id="x")
        await b.start()
        with pytest.raises(StoreUnavailable):
            await b.reserve([Hold(meter(fail_open=False), 1.0)], time.time())
        await b.close(timeout=0.3)
        assert not [k async for k in admin.scan_iter(match="kt:{team-b*")]
        await admin.aclose()
    finally:
        proc.stop()


# ---------------------------------------------------------------------- TLS, Sentinel, Cluster


async def test_tls():
    try:
        proc = TlsRedis().start()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no TLS redis-server here: {exc}")
    try:
        await round_trip(BudgetStoreSettings(url=proc.url, timeout_ms=SLOW_OK_MS), "tls")
        client = Redis.from_url(proc.url, decode_responses=True)
        await check_totals(client, "tls")
        await client.aclose()
    finally:
        proc.stop()


async def test_sentinel():
    sent = SentinelRedis().start()
    try:
        await round_trip(BudgetStoreSettings(url=sent.url, timeout_ms=SLOW_OK_MS), "sent")
        client = Redis(port=sent.master.port, decode_responses=True)
        await check_totals(client, "sent")
        await client.aclose()
    finally:
        sent.stop()


async def test_cluster_keeps_each_budget_in_one_slot():
    proc = ClusterRedis().start()
    try:
        s = await round_trip(BudgetStoreSettings(url=proc.url, timeout_ms=SLOW_OK_MS), "clu")
        assert s._cluster
        client = RedisCluster(host="127.0.0.1", port=proc.port, decode_responses=True)
        await check_totals(client, "clu")
        # the kill switch works the same through the cluster client (poll and pub/sub)
        a = RedisBudgetStore.connect(
            BudgetStoreSettings(url=proc.url, timeout_ms=SLOW_OK_MS), "clu", "/x", sidecar_id="k"
        )
        await a.start()
        res = await a.reserve([Hold(meter("b1"), 0.1)], time.time())
        a.settle(res, {}, time.time())
        await set_suspended(client, "clu", "b1", True)
        await wait_until(lambda: a.is_suspended("b1"), timeout=30)  # a hang bound, not a speed claim
        await a.close()
        await client.aclose()
    finally:
        proc.stop()


def test_url_forms_build_the_right_clients():
    s = connect_redis(BudgetStoreSettings(url="redis+cluster://10.0.0.1:7000,10.0.0.2:7001/"), None)
    assert isinstance(s, RedisCluster)
    s = connect_redis(BudgetStoreSettings(url="redis+sentinel://10.0.0.1:26379,10.0.0.2/mymaster/2"), None)
    assert s.connection_pool.service_name == "mymaster"
    assert s.connection_pool.connection_kwargs["db"] == 2
    s = connect_redis(BudgetStoreSettings(url="rediss://redis.example:6380/1", timeout_ms=20), None)
    kw = s.connection_pool.connection_kwargs
    assert kw["host"] == "redis.example" and kw["port"] == 6380 and kw["db"] == 1
    assert s.connection_pool.connection_class.__name__ == "SSLConnection"
    assert kw.get("password") is None  # credentials only ever come from files
