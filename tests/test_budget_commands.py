"""`kubetoll budget suspend|resume`: spec.suspended through the Kubernetes API, then the fast Redis flag.

The command runs as a person runs it: `kubetoll_tools.cli.main` in a thread of its
own (its own event loop), logging in through a kubeconfig that points at kmock's
Kubernetes emulator, which serves on the test's loop. The sidecars are real
(`support.harness.RunningSidecar`, each with the Redis budget store it builds
from `budgetStore.url`) on a real redis-server, answering over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
import yaml

from kubetoll_core.kill_switch import get_suspended, set_suspended
from kubetoll_tools.cli import main
from support.harness import RunningSidecar, base_config, free_port, wait_until
from support.kopf_env import Kubectl, use_kmock_kubeconfig
from support.redis_server import RedisProcess

BUDGET = "chat-budget"
KILL_SWITCH_BOUND = 2.0  # seconds: the spec (docs/redis-layout.md, "Kill switch")


def token_budget(name: str = BUDGET) -> dict[str, Any]:
    return {
        "apiVersion": "kubetoll.dev/v1alpha1",
        "kind": "TokenBudget",
        "metadata": {"name": name},
        "spec": {"routes": ["chat"], "cap": {"usdPerDay": 50}},
    }


async def kubetoll(*argv: str) -> int:
    """The CLI on a thread: it runs its own event loop while the emulator keeps serving on ours."""
    return await asyncio.to_thread(main, list(argv))


async def spec_suspended(kubectl: Kubectl, ns: str, name: str = BUDGET) -> Any:
    obj = await kubectl.get("TokenBudget", name, namespace=ns)
    assert obj is not None
    return obj["spec"].get("suspended")


@pytest.fixture
async def cluster(kmock, kubectl, tmp_path, monkeypatch, ns):
    """The emulator as the kubeconfig's cluster, with one TokenBudget in namespace `ns`."""
    use_kmock_kubeconfig(kmock, tmp_path, monkeypatch)
    monkeypatch.delenv("KUBETOLL_REDIS_URL", raising=False)
    monkeypatch.delenv("KUBETOLL_REDIS_PASSWORD", raising=False)
    await kubectl.apply(token_budget(), namespace=ns)
    return kubectl


# --------------------------------------------------------------------------- three sidecars


async def status_of(session: aiohttp.ClientSession, sc: RunningSidecar) -> tuple[int, str]:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with session.post(sc.url + "/v1/chat/completions", json=body) as resp:
        data = await resp.json(content_type=None)
        return resp.status, ((data.get("error") or {}).get("code") or "") if resp.status != 200 else ""


async def seconds_until(
    session: aiohttp.ClientSession, sc: RunningSidecar, want: tuple[int, str], t0: float, limit: float = 10.0
) -> float:
    """Send requests until one answers `want`; seconds from t0 to that answer (the loop gives up at `limit`)."""
    while True:
        got = await status_of(session, sc)
        elapsed = time.monotonic() - t0
        if got == want:
            return elapsed
        assert elapsed < limit, f"{sc.url} still answers {got} after {elapsed:.2f}s"
        await asyncio.sleep(0.01)


async def test_suspend_stops_three_sidecars_within_2s_and_resume_lets_them_admit(
    cluster, sim, redis_url, r, ns, tmp_path
) -> None:
    sidecars, configs = [], []
    for i in range(3):
        (tmp_path / f"sc{i}").mkdir()
        config = base_config(
            sim.url,
            namespace=ns,
            budgetStore={"url": redis_url, "timeoutMs": 1000},
            budgets=[{"name": BUDGET, "routes": ["chat"], "cap": {"usdPerDay": 50}}],
        )
        configs.append(config)
        sidecars.append(await RunningSidecar(tmp_path / f"sc{i}", config).start())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for sc in sidecars:
                assert await status_of(session, sc) == (200, "")

            # The sidecars' configs do not change here: only the Redis flag can stop them this fast.
            t0 = time.monotonic()
            command = asyncio.create_task(kubetoll("budget", "suspend", BUDGET, "-n", ns, "--redis-url", redis_url))
            refused = await asyncio.gather(
                *(seconds_until(session, sc, (403, "budget_suspended"), t0) for sc in sidecars)
            )
            assert await command == 0
            assert max(refused) < KILL_SWITCH_BOUND, f"seconds from `kubetoll budget suspend` to 403: {refused}"
            assert await spec_suspended(cluster, ns) is True
            assert await get_suspended(r, ns, BUDGET)
            for sc in sidecars:  # and it stays refused
                assert await status_of(session, sc) == (403, "budget_suspended")

            # The operator's compile of spec.suspended has reached the first sidecar's config.
            suspended_config = json.loads(json.dumps(configs[0]))
            suspended_config["budgets"][0]["suspended"] = True
            sidecars[0].write_config(suspended_config)
            await wait_until(lambda: sidecars[0].sidecar.config.budgets[0].suspended)

            t0 = time.monotonic()
            command = asyncio.create_task(kubetoll("budget", "resume", BUDGET, "-n", ns, "--redis-url", redis_url))
            admitted = await asyncio.gather(*(seconds_until(session, sc, (200, ""), t0) for sc in sidecars[1:]))
            assert await command == 0
            assert max(admitted) < KILL_SWITCH_BOUND, f"seconds from `kubetoll budget resume` to 200: {admitted}"
            assert await spec_suspended(cluster, ns) is False
            assert not await get_suspended(r, ns, BUDGET)
            # A cleared flag never lifts what the config still suspends ...
            assert await status_of(session, sidecars[0]) == (403, "budget_suspended")
            # ... the config with spec.suspended=false does.
            sidecars[0].write_config(configs[0])
            await seconds_until(session, sidecars[0], (200, ""), time.monotonic())
    finally:
        for sc in sidecars:
            await sc.stop()


# --------------------------------------------------------------------------- where the store comes from


async def test_store_url_comes_from_the_namespace_config_when_not_given(cluster, redis_url, r, ns, capsys) -> None:
    router = {"version": 1, "namespace": ns, "budgetStore": {"url": redis_url}}
    await cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kubetoll-router"},
            "data": {"router.json": json.dumps(router)},
        },
        namespace=ns,
    )
    assert await kubetoll("budget", "suspend", BUDGET, "-n", ns) == 0
    assert await get_suspended(r, ns, BUDGET) and await spec_suspended(cluster, ns) is True
    assert f"TokenBudget {ns}/{BUDGET} suspended" in capsys.readouterr().out


async def test_without_a_shared_store_only_the_spec_is_set_and_the_command_says_so(cluster, r, ns, capsys) -> None:
    assert await kubetoll("budget", "suspend", BUDGET, "-n", ns) == 0
    assert await spec_suspended(cluster, ns) is True
    assert not await get_suspended(r, ns, BUDGET)
    out = capsys.readouterr().out
    assert "no shared budget store" in out and "mounted config reloads" in out


async def test_namespace_defaults_to_the_kubeconfig_context(cluster, kmock, tmp_path, redis_url, r, ns) -> None:
    path = tmp_path / "kubeconfig"
    kubeconfig = yaml.safe_load(path.read_text())
    kubeconfig["contexts"][0]["context"]["namespace"] = ns
    path.write_text(yaml.safe_dump(kubeconfig))
    assert await kubetoll("budget", "suspend", BUDGET, "--redis-url", redis_url) == 0
    assert await spec_suspended(cluster, ns) is True and await get_suspended(r, ns, BUDGET)


async def test_password_protected_store(cluster, ns, monkeypatch, capsys) -> None:
    server = RedisProcess(args=("--requirepass", "kill-switch-pw")).start()
    try:
        assert await kubetoll("budget", "suspend", BUDGET, "-n", ns, "--redis-url", server.url) == 1
        err = capsys.readouterr().err
        assert "cannot reach the budget store" in err and "spec.suspended is true" in err
        assert "kill-switch-pw" not in err

        monkeypatch.setenv("KUBETOLL_REDIS_PASSWORD", "kill-switch-pw")
        assert await kubetoll("budget", "suspend", BUDGET, "-n", ns, "--redis-url", server.url) == 0
        from redis.asyncio import Redis

        client = Redis.from_url(server.url, password="kill-switch-pw", decode_responses=True)
        try:
            assert await get_suspended(client, ns, BUDGET)
        finally:
            await client.aclose()
    finally:
        server.stop()


# --------------------------------------------------------------------------- clear errors


async def test_missing_budget_changes_nothing(cluster, redis_url, r, ns, capsys) -> None:
    assert await kubetoll("budget", "suspend", "nope", "-n", ns, "--redis-url", redis_url) == 1
    err = capsys.readouterr().err
    assert f"TokenBudget {ns}/nope not found; nothing changed (spec.suspended not set, Redis flag not touched)" in err
    assert not await get_suspended(r, ns, "nope")
    assert await cluster.get("TokenBudget", "nope", namespace=ns) is None


async def test_unreachable_api_changes_nothing(tmp_path, monkeypatch, redis_url, r, ns, capsys) -> None:
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "gone", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}],
        "current-context": "gone",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    assert await kubetoll("budget", "suspend", BUDGET, "-n", ns, "--redis-url", redis_url) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Kubernetes API at {server}" in err
    assert "nothing changed (spec.suspended not set, Redis flag not touched)" in err
    assert not await get_suspended(r, ns, BUDGET)


async def test_no_kubeconfig_says_so(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    assert await kubetoll("budget", "resume", BUDGET, "-n", "x") == 1
    assert "cannot read the kubeconfig: FileNotFoundError" in capsys.readouterr().err


async def test_unreachable_redis_says_the_spec_was_set(cluster, redis_url, r, ns, capsys) -> None:
    gone = f"redis://127.0.0.1:{free_port()}/0"
    assert await kubetoll("budget", "suspend", BUDGET, "-n", ns, "--redis-url", gone, "--timeout", "2") == 1
    err = capsys.readouterr().err
    assert f"cannot reach the budget store at {gone}" in err
    assert "spec.suspended is true (the source of truth" in err and "the fast Redis flag is not set" in err
    assert await spec_suspended(cluster, ns) is True

    # A resume that cannot clear the flag says the budget stays suspended (it does: the flag wins).
    await set_suspended(r, ns, BUDGET, True)
    assert await kubetoll("budget", "resume", BUDGET, "-n", ns, "--redis-url", gone, "--timeout", "2") == 1
    err = capsys.readouterr().err
    assert (
        "spec.suspended is false, but the Redis flag is not cleared: if it was set, the budget stays suspended" in err
    )
    assert await spec_suspended(cluster, ns) is False and await get_suspended(r, ns, BUDGET)


def test_budget_without_an_action_prints_help(capsys) -> None:
    assert main(["budget"]) == 2
    assert "suspend" in capsys.readouterr().out


def test_help_lists_the_command() -> None:
    from kubetoll_tools.cli import build_parser

    assert "budget" in build_parser().format_help()
