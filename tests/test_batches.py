"""The Batch API through the sidecar: the official SDK's files and batches calls, a running sidecar and the simulator.

A batch's estimate at batch prices is reserved when it is created (the budget's
headroom drops by it, and a batch that does not fit is refused), and settled when
it ends with one ledger record per line, each the simulator's usage at the
catalogue's batch price; cancel and expiry release what was not used; a sidecar
that restarts while a batch runs (same state directory, or same Redis) settles it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from genai_prices import Usage as CatalogUsage
from genai_prices import calc_price

from kubetoll_core.enums import OnExhausted
from kubetoll_core.ledger_stream import read_ledger
from kubetoll_core.prices import resolve_batch_price, resolve_price
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.router_config import Backend, BudgetStoreSettings
from kubetoll_core.spend_record import SpendRecord, decode_record, encode_record
from kubetoll_sidecar.budgets.redis_store import RedisBudgetStore
from kubetoll_sidecar.budgets.store import Exhausted, Hold, Meter
from kubetoll_sidecar.tokens import count_chat
from support.harness import RunningSidecar, base_config, wait_until

TENANT = {"x-kubetoll-tenant": "analytics"}


def batch_config(sim_url: str, *, usd_per_day: float = 1.0, **overrides: Any) -> dict[str, Any]:
    cfg = base_config(sim_url, **overrides)
    cfg["backends"][0]["model"] = "gpt-4o-mini"
    cfg["server"]["batchPollSeconds"] = 0.05
    cfg.setdefault(
        "budgets", [{"name": "b", "routes": ["chat"], "cap": {"usdPerDay": usd_per_day}, "capOnExhausted": "reject"}]
    )
    return cfg


def jsonl(n: int, model: str = "chat", max_tokens: int = 40, first: int = 0) -> bytes:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Summarise support ticket number {i}."}],
                "max_tokens": max_tokens,
            },
        }
        for i in range(first, first + n)
    ]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


_clients: list[openai.AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    while _clients:
        await _clients.pop().close()


def client(sc: RunningSidecar) -> openai.AsyncOpenAI:
    c = sc.openai(default_headers=TENANT, timeout=30.0)  # a hang bound, not a speed claim
    _clients.append(c)
    return c


def cap_meter(sc: RunningSidecar) -> Any:
    assert sc.sidecar is not None and sc.sidecar.state is not None
    now = sc.sidecar.clock.time()
    (meter,) = sc.sidecar.state.meters.for_request("chat", "analytics", "default", now).usd
    return meter


def used(sc: RunningSidecar) -> float:
    """Spent plus reserved on the namespace's USD/day cap, as this sidecar sees it."""
    assert sc.sidecar is not None
    return sc.sidecar.store.snapshot(cap_meter(sc), sc.sidecar.clock.time()).used


def batch_cost(output: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Each output line's cost from the catalogue's batch price (not the sidecar's arithmetic), and its usage."""
    costs: dict[str, float] = {}
    usage: dict[str, Any] = {}
    for raw in output.splitlines():
        line = json.loads(raw)
        u = line["response"]["body"]["usage"]
        price = calc_price(
            CatalogUsage(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"]),
            model_ref="gpt-4o-mini",
            provider_id="openai",
            price_context={"processing": "batch"},
        )
        costs[line["custom_id"]] = float(price.total_price)
        usage[line["custom_id"]] = u
    return costs, usage


async def upload_and_create(sc: RunningSidecar, data: bytes) -> tuple[Any, float]:
    c = client(sc)
    f = await c.files.create(file=("tickets.jsonl", data), purpose="batch")
    raw = await c.batches.with_raw_response.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return raw.parse(), float(raw.headers["x-kubetoll-reserved-usd"])


def batch_records(sc: RunningSidecar, batch_id: str) -> list[SpendRecord]:
    assert sc.sidecar is not None
    return [r for r in sc.sidecar.ledger.records() if r.batch_id == batch_id]


# --------------------------------------------------------------------------- reserve, settle, release


async def test_a_batch_reserves_its_estimate_and_settles_one_record_per_line_at_batch_prices(sim, start_sidecar):
    sim.settings.batch_seconds = None  # the test says when the batch is done
    sc = await start_sidecar(batch_config(sim.url))
    c = client(sc)
    f = await c.files.create(file=("tickets.jsonl", jsonl(3)), purpose="batch")
    # The backend got the lines for itself: its model, the route's name gone.
    upload = next(r for r in sim.requests if r.path == "/v1/files" and r.method == "POST")
    assert upload.body["purpose"] == "batch" and upload.headers["authorization"] == "Bearer sk-test-openai-key-123"
    stored = sim.batches.files[f.id].content.decode().splitlines()
    assert [json.loads(x)["body"]["model"] for x in stored] == ["gpt-4o-mini"] * 3

    assert used(sc) == 0
    raw = await c.batches.with_raw_response.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch, reserved = raw.parse(), float(raw.headers["x-kubetoll-reserved-usd"])
    assert raw.headers["x-kubetoll-backend"] == "primary"
    assert batch.status == "validating" and reserved > 0
    assert used(sc) == pytest.approx(reserved)  # the headroom dropped by the whole estimate, before any line ran
    assert (await c.batches.retrieve(batch.id)).status in ("validating", "in_progress")
    assert batch_records(sc, batch.id) == []

    sim.batches.finish(batch.id)
    done = await c.batches.retrieve(batch.id)  # the call that sees it ended settles it before answering
    assert done.status == "completed" and done.request_counts.completed == 3
    output = (await c.files.content(done.output_file_id)).text
    costs, usage = batch_cost(output)

    records = batch_records(sc, batch.id)
    assert sorted(r.request_id for r in records) == ["req-0", "req-1", "req-2"]
    for r in records:
        assert r.cost_usd == pytest.approx(costs[r.request_id], abs=1e-12)
        assert r.prompt_tokens == usage[r.request_id]["prompt_tokens"]
        assert r.completion_tokens == usage[r.request_id]["completion_tokens"]
        assert (r.route, r.backend, r.tenant, r.tier) == ("chat", "primary", "analytics", "default")
    total = sum(costs.values())
    assert 0 < total < reserved
    # The reservation is gone: what the meter holds now is exactly what the lines cost.
    assert used(sc) == pytest.approx(total, abs=1e-12)
    assert sc.sidecar is not None
    assert sc.sidecar.store.spent(cap_meter(sc).key) == pytest.approx(total, abs=1e-12)
    assert sc.sidecar.batches is not None and sc.sidecar.batches.pending == {}


async def test_the_poller_settles_a_batch_nobody_asks_about(sim, start_sidecar):
    sim.settings.batch_seconds = None
    sc = await start_sidecar(batch_config(sim.url))
    batch, _ = await upload_and_create(sc, jsonl(2))
    sim.batches.finish(batch.id)
    await wait_until(lambda: len(batch_records(sc, batch.id)) == 2)
    assert used(sc) == pytest.approx(sum(r.cost_usd for r in batch_records(sc, batch.id)), abs=1e-12)


async def test_a_batch_completes_on_the_simulators_clock(sim, start_sidecar):
    sim.settings.batch_seconds = 0.3  # validating, in progress, then completed as time passes
    sc = await start_sidecar(batch_config(sim.url))
    batch, _ = await upload_and_create(sc, jsonl(2))
    await wait_until(lambda: len(batch_records(sc, batch.id)) == 2, timeout=10)
    assert (await client(sc).batches.retrieve(batch.id)).status == "completed"


async def test_cancel_releases_what_the_lines_done_did_not_use(sim, start_sidecar):
    sim.settings.batch_seconds = None
    sc = await start_sidecar(batch_config(sim.url))
    c = client(sc)
    batch, reserved = await upload_and_create(sc, jsonl(3))
    sim.batches.advance(batch.id, 1)  # one line done when the cancel comes
    cancelling = await c.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    assert used(sc) == pytest.approx(reserved)  # nothing is released until it is cancelled
    await wait_until(lambda: len(batch_records(sc, batch.id)) == 1)
    final = await c.batches.retrieve(batch.id)
    assert final.status == "cancelled" and final.request_counts.completed == 1
    costs, _ = batch_cost((await c.files.content(final.output_file_id)).text)
    (record,) = batch_records(sc, batch.id)
    assert record.cost_usd == pytest.approx(costs[record.request_id], abs=1e-12)
    assert used(sc) == pytest.approx(record.cost_usd, abs=1e-12)


async def test_an_expired_batch_bills_its_finished_lines_and_releases_the_rest(sim, start_sidecar):
    sim.settings.batch_seconds = None
    sc = await start_sidecar(batch_config(sim.url))
    batch, _ = await upload_and_create(sc, jsonl(4))
    sim.batches.advance(batch.id, 2)
    sim.batches.expire(batch.id)
    await wait_until(lambda: len(batch_records(sc, batch.id)) == 2)
    assert used(sc) == pytest.approx(sum(r.cost_usd for r in batch_records(sc, batch.id)), abs=1e-12)
    expired = await client(sc).batches.retrieve(batch.id)
    assert expired.status == "expired" and expired.error_file_id  # the lines that never ran


async def test_a_batch_that_does_not_fit_the_budget_is_429_and_never_sent(sim, start_sidecar):
    sim.settings.batch_seconds = None
    sc = await start_sidecar(batch_config(sim.url, usd_per_day=0.00018))
    first, reserved = await upload_and_create(sc, jsonl(8))
    assert reserved > 0.00009  # more than half the day's cap is held by the first batch
    c = client(sc)
    f = await c.files.create(file=("more.jsonl", jsonl(8, first=100)), purpose="batch")
    creates = sum(1 for r in sim.requests if r.path == "/v1/batches" and r.method == "POST")
    with pytest.raises(openai.RateLimitError) as err:
        await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.body["code"] == "budget_exhausted"
    assert err.value.response.headers["Retry-After"]
    assert sum(1 for r in sim.requests if r.path == "/v1/batches" and r.method == "POST") == creates
    assert used(sc) == pytest.approx(reserved)
    # Once the first batch settled for less than its estimate, the second fits.
    sim.batches.finish(first.id)
    await wait_until(lambda: len(batch_records(sc, first.id)) == 8)
    second = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert second.status == "validating"


async def test_a_suspended_budget_refuses_a_batch(sim, start_sidecar):
    cfg = batch_config(sim.url)
    cfg["budgets"][0]["suspended"] = True
    sc = await start_sidecar(cfg)
    c = client(sc)
    f = await c.files.create(file=("t.jsonl", jsonl(1)), purpose="batch")
    with pytest.raises(openai.PermissionDeniedError) as err:
        await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.body["code"] == "budget_suspended"
    assert not any(r.path == "/v1/batches" for r in sim.requests)


async def test_a_batch_larger_than_the_whole_limit_is_400(sim, start_sidecar):
    sc = await start_sidecar(batch_config(sim.url, usd_per_day=0.00001))
    c = client(sc)
    f = await c.files.create(file=("big.jsonl", jsonl(5, max_tokens=2000)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.body["code"] == "exceeds_budget_limit"
    assert "Split the batch" in err.value.body["message"]


async def test_the_estimate_is_the_pipelines_at_batch_prices_and_per_minute_buckets_are_not_charged(sim, start_sidecar):
    sim.settings.batch_seconds = None
    cfg = batch_config(sim.url, budgets=[{"name": "b", "tiers": {"default": {"tokensPerMinute": 100, "usdPerDay": 1}}}])
    cfg["routes"][0]["maxOutputTokens"] = 30
    sc = await start_sidecar(cfg)
    data = jsonl(5, max_tokens=400)
    # 5 x (prompt + 30) tokens would never fit a 100 tokens/min bucket: a batch runs at the provider's pace.
    batch, reserved = await upload_and_create(sc, data)
    lines = [json.loads(x) for x in sim.batches.files[batch.input_file_id].content.decode().splitlines()]
    assert [x["body"]["max_tokens"] for x in lines] == [30] * 5  # the route's cap, enforced upstream
    prompts = [count_chat(json.loads(x)["body"]["messages"], "gpt-4o-mini") for x in data.decode().splitlines()]
    assert sc.sidecar is not None and sc.sidecar.state is not None
    price = resolve_batch_price(sc.sidecar.state.backends["primary"].config)
    assert reserved == pytest.approx(sum(prompts) * price.base.input + 5 * 30 * price.base.output, rel=1e-9)
    assert used(sc) == pytest.approx(reserved)  # on the tier's USD/day window


async def test_an_azure_backend_gets_its_paths_its_deployment_and_its_batch_price(sim, start_sidecar):
    sim.settings.batch_seconds = None
    cfg = batch_config(sim.url)
    cfg["backends"][0] = {
        "name": "primary",
        "provider": "azure-openai",
        "model": "gpt-4o-mini",
        "endpoint": sim.url,
        "azure": {"deployment": "mini-prod", "apiVersion": "2024-10-21"},
        "credentials": {"env": "KT_TEST_OPENAI_KEY"},
    }
    sc = await start_sidecar(cfg)
    c = client(sc)
    batch, _ = await upload_and_create(sc, jsonl(2))
    upload = next(r for r in sim.requests if r.path == "/openai/files")
    assert upload.api_version == "2024-10-21" and upload.headers["api-key"] == "sk-test-openai-key-123"
    stored = [json.loads(x) for x in sim.batches.files[batch.input_file_id].content.decode().splitlines()]
    assert {(x["url"], x["body"]["model"]) for x in stored} == {("/chat/completions", "mini-prod")}
    create = next(r for r in sim.requests if r.path == "/openai/batches" and r.method == "POST")
    assert create.body["endpoint"] == "/chat/completions"
    sim.batches.finish(batch.id)
    done = await c.batches.retrieve(batch.id)
    assert done.status == "completed"
    output = (await c.files.content(done.output_file_id)).text
    records = batch_records(sc, batch.id)
    assert len(records) == 2
    for raw in output.splitlines():
        line = json.loads(raw)
        u = line["response"]["body"]["usage"]
        full = calc_price(
            CatalogUsage(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"]),
            model_ref="gpt-4o-mini",
            provider_id="azure",
        )
        (r,) = [x for x in records if x.request_id == line["custom_id"]]
        assert r.cost_usd == pytest.approx(float(full.total_price) / 2, abs=1e-12)  # Azure Global Batch: half


# --------------------------------------------------------------------------- what an upload must be


def two_route_config(sim_url: str) -> dict[str, Any]:
    cfg = batch_config(sim_url)
    cfg["backends"].append(
        {
            "name": "claude",
            "provider": "anthropic",
            "model": "claude-haiku-4-5",
            "endpoint": sim_url,
            "credentials": {"env": "KT_TEST_ANTHROPIC_KEY"},
        }
    )
    cfg["routes"] += [
        {"name": "chat-large", "rules": [{"backends": ["primary"]}]},
        {"name": "claude", "rules": [{"backends": ["claude"]}]},
    ]
    return cfg


async def test_lines_naming_two_routes_are_refused_in_openais_format(sim, start_sidecar):
    sc = await start_sidecar(two_route_config(sim.url))
    data = jsonl(2) + jsonl(1, model="chat-large", first=5)
    with pytest.raises(openai.BadRequestError) as err:
        await client(sc).files.create(file=("mixed.jsonl", data), purpose="batch")
    body = err.value.body
    assert body["code"] == "batch_routes_differ" and body["type"] == "invalid_request_error"
    assert "line 3" in body["message"] and "chat-large" in body["message"]
    assert not any(r.path == "/v1/files" for r in sim.requests)


async def test_a_route_without_an_openai_family_backend_is_a_clear_400(sim, start_sidecar):
    sc = await start_sidecar(two_route_config(sim.url))
    with pytest.raises(openai.BadRequestError) as err:
        await client(sc).files.create(file=("claude.jsonl", jsonl(1, model="claude")), purpose="batch")
    assert err.value.body["code"] == "batch_unsupported_by_route"
    assert "no OpenAI-family backend" in err.value.body["message"]


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b'{"custom_id": "a", "method": "POST"', "invalid_batch_file", "not valid JSON"),
        (jsonl(1, model="nope"), "model_not_found", "not a route"),
        (jsonl(1) + jsonl(1), "invalid_batch_file", "used by an earlier line"),
        (b"\n\n", "invalid_batch_file", "no requests"),
    ],
)
async def test_a_bad_input_file_is_400_naming_what_is_wrong(sim, start_sidecar, data, code, words):
    sc = await start_sidecar(batch_config(sim.url))
    with pytest.raises(openai.BadRequestError) as err:
        await client(sc).files.create(file=("bad.jsonl", data), purpose="batch")
    assert err.value.body["code"] == code and words in err.value.body["message"]


async def test_a_batch_of_a_file_not_uploaded_here_is_400(sim, start_sidecar):
    sc = await start_sidecar(batch_config(sim.url))
    with pytest.raises(openai.BadRequestError) as err:
        await client(sc).batches.create(
            input_file_id="file-elsewhere", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert err.value.body["code"] == "batch_input_unknown"


async def test_files_and_batches_pass_through(sim, start_sidecar):
    sim.settings.batch_seconds = None
    sc = await start_sidecar(batch_config(sim.url))
    c = client(sc)
    batch, _ = await upload_and_create(sc, jsonl(1))
    assert [b.id async for b in c.batches.list()] == [batch.id]
    f = await c.files.retrieve(batch.input_file_id)
    assert f.purpose == "batch" and f.filename == "tickets.jsonl"
    assert batch.input_file_id in [x.id async for x in c.files.list()]
    content = (await c.files.content(batch.input_file_id)).text
    assert json.loads(content)["body"]["model"] == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        await c.batches.retrieve("batch_nothing")
    assert (await c.files.delete(batch.input_file_id)).deleted
    with pytest.raises(openai.NotFoundError):
        await c.files.retrieve(batch.input_file_id)


# --------------------------------------------------------------------------- across a restart


async def test_a_batch_settles_after_the_sidecar_restarts_on_the_same_state_dir(sim, tmp_path):
    sim.settings.batch_seconds = None
    cfg = batch_config(sim.url)
    cfg["server"]["stateDir"] = str(tmp_path / "state")
    (tmp_path / "state").mkdir()
    first = await RunningSidecar(tmp_path, cfg).start()
    try:
        batch, reserved = await upload_and_create(first, jsonl(3))
    finally:
        await first.stop()
    assert (tmp_path / "state" / "batches.json").exists()

    second = await RunningSidecar(tmp_path, cfg).start()
    try:
        # A new process, a new in-memory store: it holds the running batch's reservation again.
        assert used(second) == pytest.approx(reserved)
        sim.batches.finish(batch.id)
        await wait_until(lambda: len(batch_records(second, batch.id)) == 3)
        assert used(second) == pytest.approx(sum(r.cost_usd for r in batch_records(second, batch.id)), abs=1e-12)
        assert second.sidecar is not None and second.sidecar.batches is not None
        assert second.sidecar.batches.pending == {}
    finally:
        await second.stop()
    third = await RunningSidecar(tmp_path, cfg).start()  # settled once: nothing left to settle
    try:
        assert third.sidecar is not None and third.sidecar.batches is not None
        assert third.sidecar.batches.pending == {} and used(third) == 0
    finally:
        await third.stop()


def redis_batch_config(sim_url: str, redis_url: str, ns: str, state: Path) -> dict[str, Any]:
    state.mkdir(parents=True, exist_ok=True)
    cfg = batch_config(sim_url, namespace=ns, budgetStore={"url": redis_url, "timeoutMs": 1000})
    cfg["server"]["stateDir"] = str(state)
    return cfg


async def flushed_records(r: Any, ns: str, batch_id: str, n: int, timeout: float = 10.0) -> list[SpendRecord]:
    """The batch's records in the namespace's ledger stream, once the store has flushed `n` of them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        records = [x for x in await read_ledger(r, ns, 0) if x.batch_id == batch_id]
        if len(records) >= n or loop.time() > deadline:
            return records
        await asyncio.sleep(0.02)


async def redis_spent(r: Any, ns: str, sc: RunningSidecar) -> float:
    meter = cap_meter(sc)
    fields = await r.hgetall(f"kt:{{{ns}:b}}:m:{meter.key.split(':', 1)[1]}")
    return int(fields.get("spent", 0)) / int(fields.get("scale", 1))


async def test_with_redis_a_batch_settles_after_a_restart_exactly_once(sim, redis_url, r, ns, tmp_path):
    sim.settings.batch_seconds = None
    cfg = redis_batch_config(sim.url, redis_url, ns, tmp_path / "state")
    first = await RunningSidecar(tmp_path, cfg).start()
    try:
        batch, reserved = await upload_and_create(first, jsonl(3))
        assert await r.hget(f"kt:{{{ns}}}:batches:owners", batch.id)
    finally:
        await first.stop()  # its lease (the reservation in it) goes back to Redis

    second = await RunningSidecar(tmp_path, cfg).start()
    try:
        assert used(second) >= reserved  # held again, in this sidecar's lease floor
        sim.batches.finish(batch.id)
        records = await flushed_records(r, ns, batch.id, 3)
        assert sorted(x.request_id for x in records) == ["req-0", "req-1", "req-2"]
        total = sum(x.cost_usd for x in records)
        assert await redis_spent(r, ns, second) == pytest.approx(total, abs=1e-9)
        assert await r.hlen(f"kt:{{{ns}}}:batches") == 0
    finally:
        await second.stop()


async def test_with_redis_another_sidecar_routes_the_ids_and_adopts_a_batch_whose_owner_is_gone(
    sim, redis_url, r, ns, tmp_path, monkeypatch
):
    sim.settings.batch_seconds = None
    cfg = redis_batch_config(sim.url, redis_url, ns, tmp_path / "state")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("KUBETOLL_POD_NAME", "pod-a")
    a = await RunningSidecar(tmp_path / "a", copy.deepcopy(cfg)).start()
    monkeypatch.setenv("KUBETOLL_POD_NAME", "pod-b")
    b = await RunningSidecar(tmp_path / "b", copy.deepcopy(cfg)).start()
    a_running = True
    try:
        batch, _ = await upload_and_create(a, jsonl(2))
        # B never saw the upload or the create, and finds the backend of both ids in Redis.
        assert (await client(b).batches.retrieve(batch.id)).id == batch.id
        assert b.sidecar is not None and b.sidecar.batches is not None
        await b.sidecar.batches.poll_once()
        assert b.sidecar.batches.pending == {}  # A is alive: A settles it
        a_running = False
        await a.stop()
        await r.delete(f"kt:{{{ns}}}:batches:alive:pod-a")  # A's heartbeat has run out
        await b.sidecar.batches.poll_once()
        assert list(b.sidecar.batches.pending) == [batch.id]
        assert await r.hget(f"kt:{{{ns}}}:batches:owners", batch.id) == "pod-b"
        sim.batches.finish(batch.id)
        await wait_until(lambda: len(batch_records(b, batch.id)) == 2)
        assert a.sidecar is not None and batch_records(a, batch.id) == []
    finally:
        if a_running:
            await a.stop()
        await b.stop()


async def test_a_reservation_held_open_outlives_many_lease_ttls_in_redis(redis_url, r, ns):
    """What a running batch relies on: the Redis store renews a reservation's lease for as long as it is held."""
    m = Meter(
        key="b:cap:usd:2026-11",
        kind="window",
        unit="usd",
        limit=1.0,
        budget="b",
        level="cap",
        label="b/cap/usd-month",
        on_exhausted=OnExhausted.reject,
        period_end=time.time() + 20 * 86_400,
    )
    settings = BudgetStoreSettings(url=redis_url, timeout_ms=1000)
    holder = RedisBudgetStore.connect(settings, ns, "/nonexistent", sidecar_id="holder", lease_ttl=0.4)
    other = RedisBudgetStore.connect(settings, ns, "/nonexistent", sidecar_id="other", lease_ttl=0.4)
    await holder.start()
    await other.start()
    try:
        batch = await holder.reserve([Hold(m, 0.8, enforce=False)], time.time())
        state = RedisKeys(ns).meter("b", m.key).state
        await asyncio.wait_for(_until_leased(r, state, "L:holder", 800_000_000), 10)
        await asyncio.sleep(2.0)  # five lease TTLs of Redis time: a lease nobody renewed would be gone
        assert int(await r.hget(state, "L:holder") or 0) >= 800_000_000
        with pytest.raises(Exhausted):
            await other.reserve([Hold(m, 0.5)], time.time())  # the batch's headroom is held for everyone
        holder.settle(batch, {m.key: 0.1}, time.time())
        await asyncio.wait_for(_until_leased(r, state, "spent", 100_000_000), 10)  # settled: spend, not a lease
    finally:
        await holder.close()
        await other.close()


async def _until_leased(r: Any, key: str, field: str, at_least: int) -> None:
    while int(await r.hget(key, field) or 0) < at_least:
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- prices and the record


def backend(**pricing: Any) -> Backend:
    return Backend.model_validate(
        {"name": "x", "provider": "openai", "model": "gpt-4o-mini", "endpoint": "http://x/v1", "pricing": pricing}
    )


def test_batch_prices_come_from_the_catalogue_then_the_published_discount_then_the_override():
    catalogued = resolve_batch_price(backend())
    assert catalogued.source.startswith("catalog-batch:openai/")
    assert catalogued.base.input == pytest.approx(resolve_price(backend()).base.input / 2)
    explicit = resolve_batch_price(backend(inputPerMTok=1.0, outputPerMTok=4.0))
    assert (explicit.base.input, explicit.base.output) == pytest.approx((0.5e-6, 2e-6))  # OpenAI's published 50%
    overridden = resolve_batch_price(backend(batchDiscount=0.25))
    assert overridden.base.output == pytest.approx(resolve_price(backend()).base.output * 0.75)
    azure = Backend.model_validate(
        {
            "name": "az",
            "provider": "azure-openai",
            "model": "gpt-4o-mini",
            "endpoint": "http://x",
            "azure": {"deployment": "d", "apiVersion": "2024-10-21"},
        }
    )
    assert resolve_batch_price(azure).base.input == pytest.approx(resolve_price(azure).base.input / 2)
    local = Backend.model_validate(
        {
            "name": "vllm",
            "provider": "openai-compatible",
            "model": "llama",
            "endpoint": "http://x/v1",
            "pricing": {"inputPerMTok": 1.0, "outputPerMTok": 1.0},
        }
    )
    assert resolve_batch_price(local) == resolve_price(local)  # no published discount


def test_the_batch_id_round_trips_and_older_records_decode_without_one():
    record = SpendRecord(
        time=1.5,
        namespace="ns",
        route="chat",
        backend="primary",
        tenant="t",
        tier="default",
        prompt_tokens=10,
        completion_tokens=5,
        cached_tokens=0,
        cost_usd=0.001,
        request_id="req-1",
        batch_id="batch_abc",
    )
    fields = encode_record(record, "sc-1")
    as_map = dict(zip(fields[::2], fields[1::2]))
    assert as_map["batch_id"] == "batch_abc"
    assert decode_record(as_map) == record
    older = {k: v for k, v in as_map.items() if k != "batch_id"}
    assert decode_record(older).batch_id == ""
    plain = encode_record(SpendRecord(**{**record.to_dict(), "batch_id": ""}), "sc-1")
    assert "batch_id" not in plain[::2]  # written only when set
