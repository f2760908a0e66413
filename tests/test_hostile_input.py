"""Hostile and broken input gets a 4xx, and leaves the sidecar serving and its spend readable.

Against a running sidecar, over raw sockets where a client library would refuse
to send the bytes (a header byte that is not UTF-8). Each case checks its
answer (status and OpenAI error code), then that `GET /kubetoll/v1/spend` is
200 and a normal request still works: before the fix, a tenant header `t\\xff`
was answered 200 and then broke the spend endpoint, and with the Redis store
every later flush failed. The Redis cases run on a real redis-server.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from typing import Any

import aiohttp
import pytest

from kubetoll_core.ledger_stream import read_ledger
from kubetoll_core.redis_keys import RedisKeys
from kubetoll_core.spend_record import SpendRecord
from kubetoll_sidecar.json_depth import MAX_JSON_DEPTH
from support.harness import RunningSidecar, base_config, wait_until

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
BODY = json.dumps(CHAT).encode()


class Answer:
    def __init__(self, head: bytes, body: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    answer = Answer(head[:-4], b"")
    n = int(answer.headers.get("content-length", "0"))
    answer.body = await asyncio.wait_for(reader.readexactly(n), 10) if n else b""
    return answer


async def send_raw(
    port: int, headers: dict[bytes, bytes], body: bytes, path: bytes = b"/v1/chat/completions", method: bytes = b"POST"
) -> Answer:
    """One request with exactly these header bytes, on its own connection."""
    head = method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if method == b"POST":
        head += b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
    for k, v in headers.items():
        head += k + b": " + v + b"\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


async def still_serving(sc: RunningSidecar) -> None:
    """The spend endpoint answers 200 with JSON, and a normal request is served."""
    port = sc.config["server"]["port"]
    spend = await send_raw(port, {}, b"", path=b"/kubetoll/v1/spend", method=b"GET")
    assert spend.status == 200, spend.body
    assert isinstance(spend.json()["records"], list)
    ok = await send_raw(port, {}, json.dumps(CHAT).encode())
    assert ok.status == 200, ok.body
    assert ok.json()["choices"][0]["message"]["content"]


def nested(depth: int) -> bytes:
    """JSON of `depth` containers around a string, objects and arrays in turn (too deep for json.dumps)."""
    opens = "".join('{"k":' if i % 2 == 0 else "[" for i in range(depth))
    closes = "".join("}" if i % 2 == 0 else "]" for i in reversed(range(depth)))
    return (opens + '"[{leaf}]"' + closes).encode()


def chat_with(field: str, value: bytes) -> bytes:
    return BODY[:-1] + b', "' + field.encode() + b'": ' + value + b"}"


CASES = (
    [
        # id, headers, body, status, code, param
        ("tenant-not-utf8", {b"x-kubetoll-tenant": b"t\xff"}, BODY, 400, "invalid_header", "x-kubetoll-tenant"),
        # aiohttp answers most control characters in a header itself; a tab and C1 controls (UTF-8) reach the sidecar.
        ("tenant-tab", {b"x-kubetoll-tenant": b"t\tx"}, BODY, 400, "invalid_header", "x-kubetoll-tenant"),
        ("tenant-c1-control", {b"x-kubetoll-tenant": b"t\xc2\x85x"}, BODY, 400, "invalid_header", "x-kubetoll-tenant"),
        ("tier-not-utf8", {b"x-kubetoll-tier": b"free\xc3"}, BODY, 400, "invalid_header", "x-kubetoll-tier"),
        ("request-id-not-utf8", {b"x-request-id": b"r\xff\xfe"}, BODY, 400, "invalid_header", "x-request-id"),
        ("request-id-too-long", {b"x-request-id": b"r" * 300}, BODY, 400, "invalid_header", "x-request-id"),
        (
            "user-field-control-char",
            {},
            json.dumps({**CHAT, "user": "u\u0001x"}).encode(),
            400,
            "invalid_tenant",
            "user",
        ),
        (
            "role-list",
            {},
            json.dumps({"model": "chat", "messages": [{"role": ["user"], "content": "hi"}]}).encode(),
            400,
            None,
            "messages[0].role",
        ),
        (
            "role-object",
            {},
            json.dumps({"model": "chat", "messages": [{"role": {"user": 1}, "content": "hi"}]}).encode(),
            400,
            None,
            "messages[0].role",
        ),
        ("gzip-not-gzip", {b"Content-Encoding": b"gzip"}, BODY, 400, "invalid_content_encoding", None),
        (
            "deflate-not-deflate",
            {b"Content-Encoding": b"deflate"},
            b"\x78\x9c" + BODY,
            400,
            "invalid_content_encoding",
            None,
        ),
        ("unknown-encoding", {b"Content-Encoding": b"snappy"}, BODY, 415, "unsupported_content_encoding", None),
        ("two-encodings", {b"Content-Encoding": b"gzip, gzip"}, BODY, 415, "unsupported_content_encoding", None),
        ("unknown-expect", {b"Expect": b"202-accepted"}, BODY, 417, "expectation_failed", None),
    ]
    + [
        (f"json-nested-{d}-in-{field}", {}, chat_with(field, nested(d)), 400, "json_too_deep", None)
        for d in (MAX_JSON_DEPTH + 1, 256, 300, 1000)
        for field in ("metadata", "tools")
    ]
    + [
        (
            "json-nested-in-content",
            {},
            b'{"model": "chat", "messages": [{"role": "user", "content": [' + nested(500) + b"]}]}",
            400,
            "json_too_deep",
            None,
        ),
    ]
)


@pytest.fixture
async def sidecar(sim: Any, start_sidecar: Any) -> RunningSidecar:
    return await start_sidecar(base_config(sim.url))


@pytest.mark.parametrize(
    ("headers", "body", "status", "code", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_hostile_request_gets_its_4xx_and_the_sidecar_keeps_serving(
    sidecar: RunningSidecar, headers: dict[bytes, bytes], body: bytes, status: int, code: str | None, param: str | None
) -> None:
    answer = await send_raw(sidecar.config["server"]["port"], headers, body)
    assert answer.status == status, answer.body
    err = answer.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["code"] == code
    assert err["param"] == param
    if param and param.startswith("x-"):
        assert param in err["message"]  # names the header
    if status != 417:  # an Expect is answered before the pipeline, which gives the request id
        # The answer's own request id is text (a generated one when the app's was not).
        answer.headers["x-request-id"].encode("ascii")
    await still_serving(sidecar)
    # Nothing was recorded for the refused request.
    spend = await send_raw(sidecar.config["server"]["port"], {}, b"", path=b"/kubetoll/v1/spend", method=b"GET")
    assert len(spend.json()["records"]) == 1  # only still_serving's request


async def test_gzip_body_that_is_gzip_is_served(sidecar: RunningSidecar) -> None:
    answer = await send_raw(sidecar.config["server"]["port"], {b"Content-Encoding": b"gzip"}, gzip.compress(BODY))
    assert answer.status == 200, answer.body


async def test_json_nested_to_the_bound_is_accepted(sidecar: RunningSidecar) -> None:
    # The whole document's depth: the body object, its metadata field and what it nests.
    body = chat_with("metadata", nested(MAX_JSON_DEPTH - 1))
    assert json.loads(body)  # valid JSON, nested exactly MAX_JSON_DEPTH deep
    answer = await send_raw(sidecar.config["server"]["port"], {}, body)
    assert answer.status not in (400, 500), answer.body  # past the sidecar's parse (the upstream may refuse it)
    if answer.status >= 400:
        assert answer.json()["error"]["code"] != "json_too_deep"


async def test_request_id_that_is_text_is_echoed(sidecar: RunningSidecar) -> None:
    answer = await send_raw(sidecar.config["server"]["port"], {b"x-request-id": "req-é-1".encode()}, BODY)
    assert answer.status == 200
    assert answer.headers["x-request-id"].encode("latin-1").decode() == "req-é-1"


async def test_expect_continue_with_a_body_over_the_limit_gets_413_without_100_continue(
    sidecar: RunningSidecar,
) -> None:
    port = sidecar.config["server"]["port"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200000000\r\nExpect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        answer = await read_answer(reader)  # the first thing on the wire
    finally:
        writer.close()
    assert answer.status == 413, answer.status_line
    assert answer.json()["error"]["code"] == "request_too_large"
    assert answer.headers.get("connection", "").lower() == "close"
    await still_serving(sidecar)


async def test_expect_continue_within_the_limit_still_gets_100_continue(sidecar: RunningSidecar) -> None:
    port = sidecar.config["server"]["port"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(BODY)).encode() + b"\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(BODY)
        await writer.drain()
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert answer.status == 200, answer.body


# --------------------------------------------------------------------------- with the Redis store


def poisoned(ns: str) -> SpendRecord:
    """A record the ledger codec used to choke on: a tenant and request id aiohttp decoded from b"t\\xff"."""
    return SpendRecord(
        time=time.time(),
        namespace=ns,
        route="chat",
        backend="primary",
        tenant="t\udcff",
        tier="free",
        prompt_tokens=3,
        completion_tokens=4,
        cached_tokens=0,
        cost_usd=0.001,
        request_id="r\udcff",
    )


def store_metric(text: str, stat: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'kubetoll_budget_store{{stat="{stat}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no kubetoll_budget_store sample for {stat}")


async def test_a_record_the_codec_choked_on_is_quarantined_and_flushes_go_on(
    sim: Any, start_sidecar: Any, redis_url: str, r: Any, ns: str
) -> None:
    config = base_config(
        sim.url,
        namespace=ns,
        budgetStore={"url": redis_url, "timeoutMs": 1000},
        budgets=[{"name": "b", "routes": ["chat"], "cap": {"usdPerDay": 50}, "failMode": "failClosed"}],
    )
    sc = await start_sidecar(config)
    assert sc.sidecar is not None
    store = sc.sidecar.store
    port = config["server"]["port"]

    async def ledger() -> list[SpendRecord]:
        return await read_ledger(r, ns)

    # The header path: refused at the door, nothing recorded, nothing quarantined.
    refused = await send_raw(port, {b"x-kubetoll-tenant": b"t\xff"}, BODY)
    assert refused.status == 400 and refused.json()["error"]["param"] == "x-kubetoll-tenant"

    first = await send_raw(port, {b"x-kubetoll-tenant": b"alice"}, BODY)
    assert first.status == 200, first.body
    sc.sidecar.ledger.append(poisoned(ns))  # what a request with that header used to record
    # Control characters are not defects: they round-trip through the script's JSON and Redis.
    odd_but_text = SpendRecord(
        time=time.time(), namespace=ns, route="chat", backend="primary", tenant="a\x00b\x1f\u2028é🙂", tier="free",
        prompt_tokens=1, completion_tokens=1, cached_tokens=0, cost_usd=0.0, request_id="ctl",
    )  # fmt: skip
    sc.sidecar.ledger.append(odd_but_text)
    later = await send_raw(port, {b"x-kubetoll-tenant": b"bob"}, BODY)
    assert later.status == 200, later.body  # a failClosed budget still admits: Redis answers

    await wait_until(lambda: store.stats()["buffered_records"] == 0, timeout=10)
    records = await ledger()
    assert [x.tenant for x in records] == ["alice", odd_but_text.tenant, "bob"]
    assert records[1] == odd_but_text
    assert store.available and store.stats()["quarantined_records"] == 1

    quarantine = await r.xrange(RedisKeys(ns).ledger_quarantine())
    assert len(quarantine) == 1
    fields = quarantine[0][1]
    assert fields["tenant"] == "t\\udcff" and fields["request_id"] == "r\\udcff"
    assert fields["defects"] == "tenant,request_id"
    assert fields["cost_nusd"] == "1000000"  # its spend is still known exactly

    async with aiohttp.ClientSession() as http:
        async with http.get(sc.ops_url + "/readyz") as resp:
            ready = await resp.json()
            assert resp.status == 200 and ready["budgetStore"]["available"] is True
        async with http.get(sc.ops_url + "/metrics") as resp:
            metrics = await resp.text()
    assert store_metric(metrics, "quarantined_records") == 1.0
    assert store_metric(metrics, "available") == 1.0

    # And flushes keep going after it.
    again = await send_raw(port, {b"x-kubetoll-tenant": b"carol"}, BODY)
    assert again.status == 200
    await wait_until(lambda: store.stats()["buffered_records"] == 0, timeout=10)
    assert [x.tenant for x in await ledger()][-1] == "carol"
    assert store.stats()["redis_errors"] == 0
    await still_serving(sc)
