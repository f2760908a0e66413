"""Shared budgets on a password-protected Redis with one ACL user per namespace (docs/install.md, "Redis with auth").

Real parts: a private redis-server started with `--requirepass` whose ACL users are
created with the lines docs/redis-layout.md gives ("ACL"), read from that page; the
operator on kmock's Kubernetes emulator with the credentials Secret as the kubelet
mounts it (`..data` symlinks, swapped atomically on an update); three in-process
sidecars built from the ConfigMap the operator wrote, reading the files of the
`kubetoll-credentials` Secret it wrote; the upstream simulator; the real helm binary.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from kubetoll_core.kill_switch import assert_suspensions, set_suspended
from kubetoll_core.ledger_stream import period_totals
from kubetoll_core.meters import scale_of, to_units
from kubetoll_core.redis_connect import RedisCredentials, connect_redis
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import BudgetStoreSettings, RouterConfig
from kubetoll_operator.redis_auth import PASSWORD_KEY, USERNAME_KEY, RedisAuth, StoreCredential
from kubetoll_sidecar import tokens
from kubetoll_sidecar.cache import keys as cache_keys
from support.harness import RunningSidecar
from support.helm import helm
from support.kopf_env import Kubectl, condition, eventually
from support.ports import PortTaken, is_address_in_use, start_on_free_port
from support.redis_server import RedisProcess, TlsRedis

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetoll"

ADMIN_PW = "admin-pw-" + uuid.uuid4().hex
PASSWORDS = {  # every login in play: none may show up where it does not belong
    "operator": "op-pw-" + uuid.uuid4().hex,
    "team-a": "a-pw-" + uuid.uuid4().hex,
    "team-b": "b-pw-" + uuid.uuid4().hex,
}
USERS = {"operator": "kubetoll-operator", "team-a": "kubetoll-team-a", "team-b": "kubetoll-team-b"}

MODEL = "gpt-4o"
PRICE_IN, PRICE_OUT = 10.0, 30.0  # USD per million tokens: every cost is whole nano-USD
MAX_TOKENS = 32  # the simulator answers 16 tokens: settlements stay under their reservation
MESSAGES = [{"role": "user", "content": "How far away is the moon, roughly?"}]
LIMIT_USD = 0.03  # about 50 requests' worth
NANO = scale_of("usd")
PER_SIDECAR = 4
STREAK = 2 * PER_SIDECAR
QUIET = 0.6  # longer than the store's 0.25 s negative cache
TRAFFIC_DEADLINE = 40.0  # loop bound only


# --------------------------------------------------------------------------- the ACL lines of docs/redis-layout.md


def docs_acl(user: str) -> str:
    """The `ACL SETUSER` line docs/redis-layout.md gives for `kubetoll-team-a` or `kubetoll-operator`."""
    text = (ROOT / "docs" / "redis-layout.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith(f"ACL SETUSER {user} ")]
    assert len(lines) == 1, f"docs/redis-layout.md has {len(lines)} ACL lines for {user}"
    return lines[0]


def acl_args(namespace: str | None, password: str) -> list[str]:
    """ACL SETUSER arguments: the namespace line with `team-a` replaced, or the operator's line."""
    line = docs_acl("kubetoll-operator") if namespace is None else docs_acl("kubetoll-team-a")
    if namespace is not None:
        line = line.replace("team-a", namespace)
    return line.replace(">PASSWORD", f">{password}").split()[2:]


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    proc = RedisProcess(args=("--requirepass", ADMIN_PW)).start()
    yield proc
    proc.stop()


async def create_users(redis: RedisProcess, namespaces: list[str]) -> Redis:
    """The operator's user and one per namespace; returns an admin client (closed by the caller)."""
    admin = Redis(port=redis.port, password=ADMIN_PW, decode_responses=True)
    await admin.execute_command("ACL", "SETUSER", *acl_args(None, PASSWORDS["operator"]))
    for ns in namespaces:
        await admin.execute_command("ACL", "SETUSER", *acl_args(ns, PASSWORDS[ns]))
    return admin


# --------------------------------------------------------------------------- the Secret as the kubelet mounts it


@dataclass
class MountedSecret:
    """A Secret volume: `..<timestamp>/` holds the keys, `..data` points at it, each key links through `..data`."""

    directory: Path
    generation: int = 0
    keys: set[str] = field(default_factory=set)

    def write(self, data: dict[str, str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        version = self.directory / f"..2026_12_02_{self.generation:04d}"
        version.mkdir()
        for key, value in data.items():
            (version / key).write_text(value + "\n")  # as `kubectl create secret --from-file` often has it
        tmp = self.directory / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.directory / "..data")  # the kubelet's atomic swap
        for key in data:
            if key not in self.keys:
                (self.directory / key).symlink_to(f"..data/{key}")
        for key in self.keys - set(data):
            (self.directory / key).unlink()
        self.keys = set(data)


def auth_data(namespaces: list[str]) -> dict[str, str]:
    data = {"username": USERS["operator"], "password": PASSWORDS["operator"]}
    for ns in namespaces:
        data[f"{ns}.username"] = USERS[ns]
        data[f"{ns}.password"] = PASSWORDS[ns]
    return data


# --------------------------------------------------------------------------- the namespace's resources


def resources(sim_url: str, zone: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "openai"},
            "type": "Opaque",
            "data": {"api-key": base64.b64encode(os.environ["KT_TEST_OPENAI_KEY"].encode()).decode()},
        },
        {
            "apiVersion": "kubetoll.dev/v1alpha1",
            "kind": "ModelBackend",
            "metadata": {"name": "sim"},
            "spec": {
                "provider": "openai",
                "model": MODEL,
                "endpoint": sim_url + "/v1",
                "credentials": {"secretRef": {"name": "openai", "key": "api-key"}},
                "pricing": {"inputPerMTok": PRICE_IN, "outputPerMTok": PRICE_OUT},
                # Generous: a loaded machine must not turn into 504s.
                "timeouts": {"connect": 5, "firstToken": 10, "total": 10},
            },
        },
        {
            "apiVersion": "kubetoll.dev/v1alpha1",
            "kind": "ModelRoute",
            "metadata": {"name": "chat"},
            "spec": {"rules": [{"backends": ["sim"]}]},
        },
        {
            "apiVersion": "kubetoll.dev/v1alpha1",
            "kind": "TokenBudget",
            "metadata": {"name": "shared"},
            "spec": {
                "routes": ["chat"],
                "cap": {"usdPerDay": LIMIT_USD},
                "capOnExhausted": "reject",
                # No local allowance: with Redis answering, spend stays within the cap exactly.
                "failMode": "failClosed",
                "timezone": zone,
            },
        },
    ]


def zone_at_midday(now: float) -> str:
    """A fixed-offset zone where it is about noon, so the day's period cannot end mid-test."""
    offset = 12 - time.gmtime(now).tm_hour
    return "Etc/UTC" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


async def apply_all(kubectl: Kubectl, namespace: str, sim_url: str) -> None:
    for doc in resources(sim_url, zone_at_midday(time.time())):
        await kubectl.apply(doc, namespace)


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


async def written(
    kubectl: Kubectl, namespace: str, *, with_login: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """The ConfigMap's router config and the decoded credentials Secret, once the operator wrote both."""

    async def check() -> tuple[dict[str, Any], dict[str, str]]:
        cm = await kubectl.get("ConfigMap", "kubetoll-router", namespace)
        secret = await kubectl.get("Secret", "kubetoll-credentials", namespace)
        config = json.loads(cm["data"]["router.json"])
        data = decoded(secret)
        assert [b["name"] for b in config["budgets"]] == ["shared"]
        keys = sorted(data)  # only the key names: a failing test must not print a password
        assert (PASSWORD_KEY in keys) is with_login, keys
        return config, data

    return await eventually(check, timeout=15)


async def all_text(kubectl: Kubectl, namespaces: list[str]) -> str:
    """Everything the operator wrote where apps can see it: ConfigMaps, statuses, Events."""
    out = []
    for ns in namespaces:
        out += [json.dumps(await kubectl.list("ConfigMap", ns)), json.dumps(await kubectl.list("Event", ns))]
        for kind in ("ModelBackend", "ModelRoute", "TokenBudget"):
            out.append(json.dumps([o.get("status") for o in await kubectl.list(kind, ns)]))
    return "\n".join(out)


def credentials_dir(tmp: Path, data: dict[str, str]) -> Path:
    """The mounted `kubetoll-credentials` Secret, as the sidecar container sees it."""
    tmp.mkdir(parents=True, exist_ok=True)
    for key, value in data.items():
        (tmp / key).write_text(value)
    return tmp


# --------------------------------------------------------------------------- three sidecars, one budget


@dataclass
class Tally:
    ok: int = 0
    exhausted: int = 0
    store_unavailable: int = 0
    streak: int = 0
    last_ok: float = 0.0
    costs_nusd: list[int] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def refusing(self, now: float) -> bool:
        return self.streak >= STREAK and now - self.last_ok >= QUIET


async def drive(urls: list[str]) -> tuple[list[Tally], bool]:
    """PER_SIDECAR workers per sidecar, one request after another, until every sidecar refuses."""
    tallies = [Tally() for _ in urls]
    stop = asyncio.Event()
    body = json.dumps({"model": "chat", "messages": MESSAGES, "max_tokens": MAX_TOKENS})
    headers = {"content-type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=15)

    async with aiohttp.ClientSession() as session:

        async def worker(i: int) -> None:
            t = tallies[i]
            while not stop.is_set():
                try:
                    async with session.post(
                        urls[i] + "/v1/chat/completions", data=body, headers=headers, timeout=timeout
                    ) as r:
                        data = await r.read()
                        code = None
                        if r.status != 200:
                            try:
                                code = (json.loads(data).get("error") or {}).get("code")
                            except (ValueError, AttributeError):
                                pass
                        if r.status == 200:
                            t.ok += 1
                            t.streak = 0
                            t.last_ok = time.monotonic()
                            t.costs_nusd.append(int(Decimal(r.headers["x-kubetoll-cost-usd"]) * NANO))
                        elif r.status == 429 and code == "budget_exhausted":
                            t.exhausted += 1
                            t.streak += 1
                        elif r.status == 503 and code == "budget_store_unavailable":
                            t.store_unavailable += 1  # failClosed: spends nothing
                            t.streak = 0
                        else:
                            t.unexpected.append(f"HTTP {r.status}: {data[:300]!r}")
                            t.streak = 0
                except (aiohttp.ClientError, TimeoutError) as exc:
                    t.unexpected.append(repr(exc))

        workers = [asyncio.create_task(worker(i)) for i in range(len(urls)) for _ in range(PER_SIDECAR)]
        deadline = time.monotonic() + TRAFFIC_DEADLINE
        refusing = False
        while time.monotonic() < deadline:
            if all(t.refusing(time.monotonic()) for t in tallies):
                refusing = True
                break
            if any(t.unexpected for t in tallies):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
    return tallies, refusing


async def test_three_sidecars_share_one_budget_on_a_password_protected_redis(
    sim: Any, redis: RedisProcess, kubectl: Kubectl, start_operator: Any, tmp_path: Path, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = await create_users(redis, ["team-a", "team-b"])
    mounted = MountedSecret(tmp_path / "redis-auth")
    mounted.write(auth_data(["team-a", "team-b"]))
    for ns in ("team-a", "team-b"):
        await apply_all(kubectl, ns, sim.url)
    await start_operator(
        redis_url=redis.url,
        redis_auth_dir=str(mounted.directory),
        redis_auth_per_namespace=True,
        spend_interval_seconds=0.2,
    )
    config, data = await written(kubectl, "team-a")
    _, data_b = await written(kubectl, "team-b")

    # The config names the files; the Secret holds the namespace's own login, and nothing else of the store's.
    store = config["budgetStore"]
    assert store["url"] == redis.url
    assert (store["usernameFile"], store["passwordFile"]) == (USERNAME_KEY, PASSWORD_KEY)
    assert (data[USERNAME_KEY], data[PASSWORD_KEY]) == (USERS["team-a"], PASSWORDS["team-a"])
    assert (data_b[USERNAME_KEY], data_b[PASSWORD_KEY]) == (USERS["team-b"], PASSWORDS["team-b"])
    assert data["openai_api-key"] == os.environ["KT_TEST_OPENAI_KEY"]  # the backend's key beside it
    for secret_of, values in (("team-a", data), ("team-b", data_b)):
        others = [pw for who, pw in PASSWORDS.items() if who != secret_of] + [ADMIN_PW]
        assert not [pw for pw in others if any(pw in v for v in values.values())], secret_of

    # Three sidecars of team-a, each from the operator's config and the Secret's files.
    creds = credentials_dir(tmp_path / "credentials", data)
    sidecars = []
    try:
        for i in range(3):
            cfg = json.loads(json.dumps(config))
            cfg["server"]["credentialsDir"] = str(creds)  # RunningSidecar binds ports of its own
            # About sharing, not timeouts: a loaded 2-core machine must not look like a Redis outage.
            cfg["budgetStore"]["timeoutMs"] = 1000
            RouterConfig.model_validate(cfg)
            d = tmp_path / f"sidecar-{i}"
            d.mkdir()
            sidecars.append(await RunningSidecar(d, cfg).start())
        tallies, refusing = await drive([sc.url for sc in sidecars])
        assert not [u for t in tallies for u in t.unexpected], [t.unexpected for t in tallies]
        assert refusing, f"not every sidecar came to refuse: {[(t.ok, t.exhausted) for t in tallies]}"
        assert all(t.ok > 0 and t.exhausted > 0 for t in tallies), [(t.ok, t.exhausted) for t in tallies]
        for sc in sidecars:
            assert sc.sidecar is not None
            stats = sc.sidecar.store.stats()
            assert stats["redis_errors"] == 0, stats  # every call authenticated (no NOAUTH, no NOPERM)
    finally:
        for sc in sidecars:
            await sc.stop()

    # The combined admitted spend respects the one cap. Each sidecar alone with its own budget
    # would have admitted the whole cap: three times it.
    limit_units = to_units(LIMIT_USD, NANO)
    est_units = to_units((tokens.count_chat(MESSAGES, MODEL) * PRICE_IN + MAX_TOKENS * PRICE_OUT) / 1e6, NANO)
    costs = [c for t in tallies for c in t.costs_nusd]
    over_estimate = sum(max(0, c - est_units) for c in costs)  # docs/redis-layout.md, "The overshoot bound"
    admitted = sum(costs)
    assert admitted <= limit_units + over_estimate, (admitted, limit_units, over_estimate)
    assert limit_units - admitted < 4 * est_units, "the sidecars stopped far short of the cap"
    [meter] = [m for m in await period_totals(admin, "team-a", "shared") if m.unit == "usd"]
    assert meter.spent_units == admitted and meter.limit_units == limit_units
    assert meter.leased_units == 0

    # The operator's spend reader logs in with its own user and reads the same figure.
    async def spend_read() -> None:
        budget = await kubectl.get("TokenBudget", "shared", "team-a")
        assert condition(budget, "SpendKnown")["status"] == "True", budget["status"]
        assert abs(float(budget["status"]["spent"]) - meter.spent_units / NANO) < 1e-9, budget["status"]

    await eventually(spend_read, timeout=15)

    # No password anywhere apps or logs can see (the operator's log lines are in caplog: it runs in this process).
    assert "namespace team-a: compiled" in caplog.text
    text = await all_text(kubectl, ["team-a", "team-b"]) + caplog.text
    assert not [pw for pw in [ADMIN_PW, *PASSWORDS.values()] if pw in text]
    await admin.aclose()


async def test_a_namespace_gets_its_own_login_only_and_a_rotation_reaches_it(
    sim: Any, redis: RedisProcess, kubectl: Kubectl, start_operator: Any, tmp_path: Path, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = await create_users(redis, ["team-a", "team-b"])
    mounted = MountedSecret(tmp_path / "redis-auth")
    mounted.write(auth_data(["team-a", "team-b"]))  # nothing for team-c
    for ns in ("team-a", "team-b", "team-c"):
        await apply_all(kubectl, ns, sim.url)
    await start_operator(
        redis_url=redis.url,
        redis_auth_dir=str(mounted.directory),
        redis_auth_per_namespace=True,
        redis_auth_poll_seconds=0.1,
    )
    config_a, data_a = await written(kubectl, "team-a")
    config_b, data_b = await written(kubectl, "team-b")

    # team-c has no pair: it gets no login at all (neither the operator's nor another's), and the log says what to add.
    config_c, data_c = await written(kubectl, "team-c", with_login=False)
    assert sorted(data_c) == ["openai_api-key"]
    assert config_c["budgetStore"]["url"] == redis.url and "passwordFile" not in config_c["budgetStore"]
    assert "team-c.password" in caplog.text

    # team-a writes its budget's keys with its own login ...
    settings_a = BudgetStoreSettings.model_validate(config_a["budgetStore"])
    user_a = connect_redis(
        settings_a, RedisCredentials.for_store(settings_a, str(credentials_dir(tmp_path / "a", data_a)))
    )
    await set_suspended(user_a, "team-a", "shared", True)
    assert await user_a.get(RedisKeys("team-a").suspended("shared"))
    # ... and team-b's login, from team-b's Secret, can neither read nor write them.
    settings_b = BudgetStoreSettings.model_validate(config_b["budgetStore"])
    user_b = connect_redis(
        settings_b, RedisCredentials.for_store(settings_b, str(credentials_dir(tmp_path / "b", data_b)))
    )
    await user_b.ping()
    with pytest.raises(NoPermissionError):
        await user_b.get(RedisKeys("team-a").suspended("shared"))
    with pytest.raises(NoPermissionError):
        await period_totals(user_b, "team-a")
    with pytest.raises(NoPermissionError):
        await set_suspended(user_b, "team-a", "shared", False)
    assert await admin.exists(RedisKeys("team-a").suspended("shared"))
    # team-c's sidecars, with no login, are refused by Redis.
    settings_c = BudgetStoreSettings.model_validate(config_c["budgetStore"])
    anonymous = connect_redis(settings_c, RedisCredentials.for_store(settings_c, str(tmp_path / "c")))
    with pytest.raises((AuthenticationError, ResponseError)):
        await anonymous.get(RedisKeys("team-c").suspended("shared"))

    # A rotation: team-a's new password in Redis and in the mounted Secret reaches team-a's Secret only.
    rotated = "a-pw-rotated-" + uuid.uuid4().hex
    await admin.execute_command("ACL", "SETUSER", *acl_args("team-a", rotated))
    mounted.write({**auth_data(["team-a", "team-b"]), "team-a.password": rotated})

    async def rotated_in() -> None:
        secret = decoded(await kubectl.get("Secret", "kubetoll-credentials", "team-a"))
        assert secret[PASSWORD_KEY] == rotated

    await eventually(rotated_in, timeout=15)
    assert decoded(await kubectl.get("Secret", "kubetoll-credentials", "team-b")) == data_b
    new_a = credentials_dir(tmp_path / "a2", decoded(await kubectl.get("Secret", "kubetoll-credentials", "team-a")))
    user_a2 = connect_redis(settings_a, RedisCredentials.for_store(settings_a, str(new_a)))
    assert await user_a2.get(RedisKeys("team-a").suspended("shared"))

    text = await all_text(kubectl, ["team-a", "team-b", "team-c"]) + caplog.text
    leaked = [pw for pw in [ADMIN_PW, rotated, *PASSWORDS.values()] if pw in text]
    assert not leaked
    for c in (user_a, user_b, user_a2, anonymous, admin):
        await c.aclose()


async def test_a_namespace_login_from_the_operator_works_over_tls(tmp_path: Path) -> None:
    """rediss:// with the login the operator hands out: the URL passes through, the files name the login."""
    try:
        proc = TlsRedis().start()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no TLS redis-server here: {exc}")
    try:
        admin = Redis.from_url(proc.url, decode_responses=True)
        await admin.execute_command("ACL", "SETUSER", *acl_args("team-a", PASSWORDS["team-a"]))
        await admin.config_set("requirepass", ADMIN_PW)  # this connection stays logged in
        mounted = MountedSecret(tmp_path / "auth")
        mounted.write(auth_data(["team-a"]))
        credential = RedisAuth(mounted.directory, per_namespace=True).for_namespace("team-a")
        assert credential is not None
        settings = credential.store_settings(proc.url)
        files = {k: base64.b64decode(v).decode() for k, v in credential.secret_data().items()}
        creds = credentials_dir(tmp_path / "credentials", files)
        user = connect_redis(settings, RedisCredentials.for_store(settings, str(creds)))
        await set_suspended(user, "team-a", "shared", True)
        assert await admin.exists(RedisKeys("team-a").suspended("shared"))
        anonymous = connect_redis(BudgetStoreSettings(url=proc.url), None)
        with pytest.raises((AuthenticationError, ResponseError)):
            await anonymous.get(RedisKeys("team-a").suspended("shared"))
        for c in (user, anonymous, admin):
            await c.aclose()
    finally:
        proc.stop()


def login_files(directory: Path, who: str) -> RedisCredentials:
    """`who`'s login as the CLI and the operator take it: a username file and a password file."""
    directory.mkdir(parents=True)
    (directory / "username").write_text(USERS[who] + "\n")
    (directory / "password").write_text(PASSWORDS[who] + "\n")
    return RedisCredentials(directory / "username", directory / "password")


async def test_the_documented_lines_run_cache_flush_and_the_kill_switch(redis: RedisProcess, tmp_path: Path) -> None:
    """`kubetoll cache flush` under a namespace's user; the kill switch under the operator's and the namespace's.

    Redis' ACL LOG lists every command it refused to whom: at the end it holds only
    the flush's SCAN, which the namespace line leaves out on purpose.
    """
    admin = await create_users(redis, ["team-a", "team-b"])
    old = cache_keys.entry_key("team-a", "faq", "g0", "h1")
    theirs = cache_keys.entry_key("team-b", "faq", "g0", "h1")
    await admin.set(old, "old answer", ex=600)
    await admin.set(theirs, "their answer", ex=600)
    await admin.acl_log_reset()
    team_a = login_files(tmp_path / "team-a", "team-a")

    # The CLI as a person runs it, with team-a's login files and nothing from this process' environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETOLL_")}
    flush = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kubetoll_tools.cli",
        "cache",
        "flush",
        "--redis-url",
        redis.url,
        "--namespace",
        "team-a",
        "--policy",
        "faq",
        "--username-file",
        str(tmp_path / "team-a" / "username"),
        "--password-file",
        str(tmp_path / "team-a" / "password"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(flush.communicate(), 60)  # a hang bound only
    assert flush.returncode == 0, err.decode()
    assert "epoch is now 1" in out.decode() and "left to expire by their TTL" in out.decode(), out.decode()
    assert await admin.get(cache_keys.epoch_key("team-a", "faq")) == "1"
    assert await admin.ttl(old) > 0  # left to its TTL: no SCAN, so nothing was deleted
    assert await admin.get(theirs) == "their answer"
    assert PASSWORDS["team-a"] not in out.decode() + err.decode()

    # The operator: `assert_suspensions` on each pass, `set_suspended` (also what `kubetoll budget` runs).
    operator = connect_redis(
        BudgetStoreSettings(url=redis.url),
        login_files(tmp_path / "operator", "operator"),
        client_name="kubetoll-operator",
    )
    keys = RedisKeys("team-a")
    await set_suspended(operator, "team-a", "chat", True)
    # `chat` is known now, so its running value stands against the spec; `batch` is not, so the spec's is written.
    assert await assert_suspensions(operator, "team-a", {"chat": False, "batch": True}) == ["batch"]
    for budget in ("chat", "batch"):
        assert await admin.exists(keys.suspended(budget), keys.suspension_known(budget)) == 2, budget
    # `kubetoll budget resume` with the namespace's own login.
    user_a = connect_redis(BudgetStoreSettings(url=redis.url), team_a)
    await set_suspended(user_a, "team-a", "chat", False)
    assert not await admin.exists(keys.suspended("chat")) and await admin.exists(keys.suspension_known("chat"))

    refused = [(e["username"], e["object"]) for e in await admin.acl_log()]
    assert refused == [(USERS["team-a"], "scan")], refused
    for c in (operator, user_a, admin):
        await c.aclose()


def test_the_auth_directory_reads_only_the_namespaces_own_keys(tmp_path: Path) -> None:
    mounted = MountedSecret(tmp_path / "auth")
    mounted.write({"password": "op", "team-a.password": "a", "team-a.username": "ua", "team-ab.password": "ab"})
    per_ns = RedisAuth(mounted.directory, per_namespace=True)
    a = per_ns.for_namespace("team-a")
    assert a == StoreCredential("ua", "a") and "a" not in repr(a).replace("StoreCredential", "")
    assert per_ns.for_namespace("team-ab") == StoreCredential(None, "ab")
    assert per_ns.for_namespace("team-b") is None  # never the operator's `password`
    for bad in ("team-a.password", "../auth", "x/y"):
        with pytest.raises(ValueError):
            per_ns.for_namespace(bad)
    assert per_ns.operator_credentials().get_credentials() == ("op",)
    shared = RedisAuth(mounted.directory, per_namespace=False)
    assert shared.for_namespace("team-b") == StoreCredential(None, "op")
    assert StoreCredential(None, "op").store_settings("rediss://r:6380/0").model_dump(exclude_none=True) == {
        "url": "rediss://r:6380/0",
        "password_file": PASSWORD_KEY,
        "timeout_ms": 50.0,
        "ledger_retention_days": 35,
        "max_meters": 100_000,
        "expected_sidecars": 0,
    }
    before = per_ns.fingerprint()
    mounted.write({"password": "op", "team-a.password": "a2", "team-a.username": "ua", "team-ab.password": "ab"})
    assert per_ns.fingerprint() != before and per_ns.for_namespace("team-a") == StoreCredential("ua", "a2")
    # The two keys never collide with a backend's `<secret>_<key>`.
    assert "_" not in USERNAME_KEY + PASSWORD_KEY


# --------------------------------------------------------------------------- the chart


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "kubetoll", str(CHART), "--namespace", "kubetoll-system", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


AUTH_EXTERNAL = [
    "--set",
    "redis.url=rediss://redis.infra.svc:6380/0",
    "--set",
    "redis.auth.existingSecret=kubetoll-redis-auth",
    "--set",
    "redis.auth.perNamespace=true",
]
AUTH_BUNDLED = ["--set", "redis.deploy=true", "--set", "redis.auth.existingSecret=kubetoll-redis-auth"]


@pytest.mark.parametrize("values", [AUTH_EXTERNAL, AUTH_BUNDLED], ids=["external-per-namespace", "bundled"])
def test_chart_with_auth_lints_and_validates(values: list[str]) -> None:
    assert "0 chart(s) failed" in helm("lint", str(CHART), "--strict", "--namespace", "kubetoll-system", *values).stdout
    for doc in render(*values):
        if doc["apiVersion"].startswith(("monitoring.coreos.com", "cert-manager.io", "kopf.dev")):
            continue
        kubernetes_validate.validate(doc, "1.25", strict=True)


def test_chart_mounts_the_auth_secret_into_the_operator_only() -> None:
    import argparse

    from kubetoll_operator.main import add_arguments

    docs = render(*AUTH_EXTERNAL)
    pod = one(docs, "Deployment", "kubetoll-operator")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volume = {v["name"]: v for v in pod["volumes"]}["redis-auth"]
    assert volume["secret"] == {"secretName": "kubetoll-redis-auth", "defaultMode": 0o440}
    mount = {m["name"]: m for m in container["volumeMounts"]}["redis-auth"]
    assert mount == {"name": "redis-auth", "mountPath": "/etc/kubetoll/redis-auth", "readOnly": True}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(container["args"])
    assert args.redis_auth_dir == mount["mountPath"] and args.redis_auth_per_namespace
    # No password in the pod spec itself, and no RBAC on Secrets needed for it: it is a volume.
    assert "kubetoll-redis-auth" not in json.dumps(container.get("env", []))
    shared = parser.parse_args(
        one(render(*AUTH_EXTERNAL[:4]), "Deployment", "kubetoll-operator")["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
    )
    assert shared.redis_auth_dir == "/etc/kubetoll/redis-auth" and not shared.redis_auth_per_namespace
    plain = one(render("--set", "redis.url=redis://r:6379/0"), "Deployment", "kubetoll-operator")
    assert "redis-auth" not in json.dumps(plain)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "redis.auth.existingSecret=s"], "needs a Redis"),
        (
            ["--set", "redis.url=redis://r:6379/0", "--set", "redis.auth.perNamespace=true"],
            "needs redis.auth.existingSecret",
        ),
        ([*AUTH_BUNDLED, "--set", "redis.auth.perNamespace=true"], "ACL users the chart's Redis does not create"),
        (["--set", "redis.auth.passwordKey=x"], "additional properties"),
    ],
)
def test_chart_refuses_auth_values_that_cannot_work(values: list[str], message: str) -> None:
    result = helm("template", "kubetoll", str(CHART), "--namespace", "kubetoll-system", *values, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def wait_for_auth(proc: subprocess.Popen, port: int, password: str, log: Path) -> None:
    import redis as sync_redis

    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            if is_address_in_use(text):
                raise PortTaken(f"port {port}")
            raise AssertionError(f"redis-server exited with {proc.returncode}")  # its log may hold the password
        try:
            with sync_redis.Redis(port=port, password=password, socket_timeout=0.5) as client:
                client.ping()
                return
        except sync_redis.ConnectionError:
            assert time.monotonic() < deadline, "the chart's Redis did not start"
            time.sleep(0.05)


def test_the_charts_redis_requires_the_secrets_password(tmp_path: Path) -> None:
    """Run the rendered Redis container's command and probe with a real redis-server (paths moved to tmp)."""
    pod = one(render(*AUTH_BUNDLED), "Deployment", "kubetoll-redis")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {v["name"]: v for v in pod["volumes"]}["redis-auth"]["secret"] == {
        "secretName": "kubetoll-redis-auth",
        "items": [{"key": "password", "path": "password"}],
        "defaultMode": 0o440,
    }
    assert {"name": "redis-auth", "mountPath": "/etc/kubetoll/redis-auth", "readOnly": True} in container[
        "volumeMounts"
    ]
    auth, data = tmp_path / "auth", tmp_path / "data"
    auth.mkdir()
    data.mkdir()
    password = "chart pw " + uuid.uuid4().hex  # inner space kept, surrounding whitespace dropped
    (auth / "password").write_text(f"  {password}\n")

    def moved(text: str) -> str:
        return text.replace("/etc/kubetoll/redis-auth", str(auth)).replace("/data/", f"{data}/")

    command = [moved(part) for part in container["command"]]
    log = tmp_path / "redis.log"

    def start(port: int) -> tuple[subprocess.Popen, int]:
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*command, *container["args"], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_auth(proc, port, password, log)
        except BaseException:
            proc.kill()
            proc.wait(5)
            raise
        return proc, port

    proc, port = start_on_free_port(start)
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert "redis-server" in cmdline and password.split()[-1] not in cmdline
        assert password.split()[-1] not in (data / "users.acl").read_text()
        cli = ["redis-cli", "-p", str(port)]
        assert "NOAUTH" in subprocess.run([*cli, "get", "x"], capture_output=True, text=True).stdout
        ok = subprocess.run(
            [*cli, "ping"], capture_output=True, text=True, env={**os.environ, "REDISCLI_AUTH": password}
        )
        assert ok.stdout.strip() == "PONG"
        # The readiness probe passes with the mounted password and fails with another.
        probe = [
            re.sub(r"\bredis-cli\b", f"redis-cli -p {port}", moved(p))
            for p in container["readinessProbe"]["exec"]["command"]
        ]
        assert subprocess.run(probe, capture_output=True).returncode == 0
        (auth / "password").write_text("wrong\n")
        assert subprocess.run(probe, capture_output=True).returncode != 0
    finally:
        proc.kill()
        proc.wait(5)
