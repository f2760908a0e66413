"""What the sidecar does with an upstream's errors and with requests no backend can serve.

* a caller's 4xx from an upstream never counts toward opening the backend's circuit
  (in a response or as an error event inside a 200 stream); 429 still does;
* Retry-After is read by one parser (`kubetoll_sidecar.retry_after`): delta-seconds
  and HTTP-dates; inf / 1e9 are cut to `circuitBreaker.maxRetryAfterSeconds`,
  nan / negative values ignored;
* a request no backend of its route can serve (more choices than a backend without
  `n` fans out, /v1/completions, /v1/embeddings, the `function` role on an
  Anthropic-only route) is a 400 decided
  before anything is sent, and one that needs more than a budget level's whole
  limit is a 400 too, not a 429 to retry at the end of the day.
"""

from __future__ import annotations

import email.utils
import time

import aiohttp
import openai
import pytest

from kubetoll_core.enums import FailureClass
from kubetoll_core.periods import FakeClock
from kubetoll_sidecar.circuit import counts_against_backend
from kubetoll_sidecar.providers.anthropic import AnthropicTranslator
from kubetoll_sidecar.providers.openai import OpenAITranslator
from kubetoll_sidecar.retry_after import RETRY_AFTER_CEILING, parse_retry_after, retry_after_from_headers
from kubetoll_tools.simulator import Fault, parse_fault
from support.harness import RunningSidecar, base_config

T0 = 1_790_000_000.0  # a fixed wall clock for the budget tests
CHAT = {"messages": [{"role": "user", "content": "hello"}]}


class FakeMonotonic:
    """The monotonic clock the breakers read: advanced by the test, never slept through."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def backend(name: str, provider: str, url: str, **extra: object) -> dict[str, object]:
    anthropic = provider == "anthropic"
    return {
        "name": name,
        "provider": provider,
        "model": "claude-haiku-4-5" if anthropic else "gpt-4o",
        "endpoint": url if anthropic else url + "/v1",
        "credentials": {"env": "KT_TEST_OPENAI_KEY"},  # the simulators' key, whatever they speak
        "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
        **extra,
    }


def config(backends: list[dict[str, object]], routes: dict[str, list[str]], **extra: object) -> dict[str, object]:
    cfg = base_config("http://unused")
    cfg["backends"] = backends
    cfg["routes"] = [{"name": name, "rules": [{"backends": chain}]} for name, chain in routes.items()]
    cfg.update(extra)
    return cfg


async def post(sc: RunningSidecar, path: str = "/v1/chat/completions", **body: object) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + path, json=body) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)


async def read_stream(sc: RunningSidecar, **body: object) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            return r.status, dict(r.headers), await r.read()


def breaker(sc: RunningSidecar, name: str):
    assert sc.sidecar is not None
    return dict(sc.sidecar.breakers.items())[name]


def requests_counted(sc: RunningSidecar) -> float:
    """Requests the sidecar handled (kubetoll_requests_total over every label)."""
    assert sc.sidecar is not None
    return sum(
        sample.value
        for metric in sc.sidecar.metrics.registry.collect()
        if metric.name == "kubetoll_requests"
        for sample in metric.samples
        if sample.name == "kubetoll_requests_total"
    )


@pytest.fixture
async def running(tmp_path):
    started: list[RunningSidecar] = []

    async def _start(cfg, **kw) -> RunningSidecar:
        sc = RunningSidecar(tmp_path, cfg, **kw)
        started.append(sc)
        return await sc.start()

    yield _start
    for sc in started:
        await sc.stop()


# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    "value,expected",
    [
        ("2", 2.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),  # providers send decimals
        ("0", 0.0),
        ("inf", 300.0),  # "come back much later": cut to the maximum, not for ever
        ("Infinity", 300.0),
        ("1e9", 300.0),  # 31 years, cut
        ("301", 300.0),
        ("nan", None),  # not a wait at all: ignored
        ("-5", None),
        ("-inf", None),
        ("soon", None),
        ("", None),
        ("9" * 200, None),  # not a header value anyone sends
        (None, None),
    ],
)
def test_delay_seconds(value, expected):
    assert parse_retry_after(value, maximum=300.0) == expected


def test_http_date_is_measured_from_the_responses_date_header():
    # The upstream's own clock on both sides: a skewed local clock does not matter.
    got = parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", date="Wed, 21 Oct 2015 07:28:00 GMT", now=0.0)
    assert got == 30.0


def test_http_date_without_a_date_header_is_measured_from_now():
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:45 GMT", now=now) == 45.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0  # in the past: now
    assert parse_retry_after("Wed, 21 Oct 2015 09:28:00 GMT", now=now, maximum=300.0) == 300.0  # far: cut
    # The obsolete forms HTTP still allows (RFC 850, asctime).
    assert parse_retry_after("Wednesday, 21-Oct-15 07:28:10 GMT", now=now) == 10.0
    assert parse_retry_after("Wed Oct 21 07:28:20 2015", now=now) == 20.0
    assert parse_retry_after("Wed, 99 Foo 2015 07:28:00 GMT", now=now) is None


def test_headers_ms_first_any_case_and_a_ceiling_without_a_maximum():
    assert retry_after_from_headers({"Retry-After-Ms": "1500", "Retry-After": "9"}) == 1.5
    assert retry_after_from_headers({"retry-after-ms": "junk", "retry-after": "9"}) == 9.0
    assert retry_after_from_headers({"retry-after-ms": "inf"}, maximum=60.0) == 60.0
    assert retry_after_from_headers({"RETRY-AFTER": "3"}) == 3.0
    assert retry_after_from_headers({}) is None and retry_after_from_headers(None) is None
    # A translator does not know the backend's maximum: it cuts at the ceiling any config may set.
    assert retry_after_from_headers({"retry-after": "inf"}) == RETRY_AFTER_CEILING


@pytest.mark.parametrize("translator", [OpenAITranslator(), AnthropicTranslator()], ids=["openai", "anthropic"])
@pytest.mark.parametrize(
    "value,expected", [("inf", RETRY_AFTER_CEILING), ("1e9", RETRY_AFTER_CEILING), ("nan", None), ("-5", None)]
)
def test_every_translator_reads_retry_after_through_the_one_parser(translator, value, expected):
    err = translator.classify_error(429, {"retry-after": value}, b"{}")
    assert err.failure is FailureClass.rate_limited and err.retry_after == expected


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_a_callers_4xx_never_counts_whatever_it_was_classed_as(status):
    for failure in (None, FailureClass.server_error, FailureClass.context_length_exceeded, FailureClass.timeout):
        assert not counts_against_backend(failure, status)


def test_what_does_count():
    assert counts_against_backend(FailureClass.rate_limited, 429)
    assert counts_against_backend(FailureClass.server_error, 500)
    assert counts_against_backend(FailureClass.timeout, 0)
    assert counts_against_backend(FailureClass.connection_error, 0)
    assert counts_against_backend(FailureClass.budget_exhausted, 402)
    # Anthropic's "credit balance is too low" comes as a 400: the account, not the request.
    assert counts_against_backend(FailureClass.budget_exhausted, 400)


def test_a_message_quoting_the_callers_input_is_not_taken_for_an_empty_account():
    body = b'{"type":"error","error":{"type":"invalid_request_error","message":"messages.0: the text \\"credit balance is too low\\" is invalid"}}'
    assert AnthropicTranslator().classify_error(400, {}, body).failure is None


def test_the_simulator_sends_any_retry_after_value():
    assert parse_fault("429;retry-after=inf").retry_after == float("inf")
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    fault = parse_fault(f"429;retry-after={date}")
    assert fault.retry_after is None and fault.retry_after_header == date


# --------------------------------------------------------------------------- 4xx and the circuit


@pytest.mark.parametrize("stream", [False, True], ids=["response", "in-stream"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_callers_4xx_does_not_open_the_circuit(sim, sim2, running, provider, stream):
    primary = backend("primary", provider, sim.url, circuitBreaker={"failureThreshold": 2, "cooldownSeconds": 600})
    sc = await running(config([primary, backend("secondary", "openai", sim2.url)], {"chat": ["primary", "secondary"]}))
    send = read_stream if stream else post
    for status in (400, 401, 403, 404, 413, 422):
        for _ in range(3):  # past the threshold of 2, each time
            sim.enqueue_fault(parse_fault(f"stream_error;status={status}" if stream else str(status)))
            got, headers, _ = await send(sc, model="chat", **CHAT)
            # The caller gets the provider's answer, not a 502, and nothing is fallen back to.
            assert got == status or (got == 400 and status in (403, 413, 422)), (status, got)
            assert headers["x-kubetoll-backend"] == "primary"
        assert breaker(sc, "primary").state == "closed", status
    assert not sim2.requests
    # A good request after 18 bad ones is served by the same backend.
    got, headers, _ = await send(sc, model="chat", **CHAT)
    assert got == 200 and headers["x-kubetoll-backend"] == "primary"
    # The control: failures that are the backend's do open it, at the threshold.
    for _ in range(2):
        sim.enqueue_fault(parse_fault("stream_error;status=500" if stream else "500"))
        got, headers, _ = await send(sc, model="chat", **CHAT)
        assert got == 200 and headers["x-kubetoll-backend"] == "secondary"
    assert breaker(sc, "primary").state == "open"


async def test_429_pauses_the_backend_for_its_retry_after(sim, sim2, running):
    """The decision for 429: the provider is rate-limiting this sidecar's key, for every caller,
    so it opens the circuit at once for the Retry-After (and without one counts like a 5xx)."""
    clock = FakeMonotonic()
    cfg = config(
        [backend("primary", "openai", sim.url), backend("secondary", "openai", sim2.url)],
        {"chat": ["primary", "secondary"]},
    )
    sc = await running(cfg, monotonic=clock)
    sim.enqueue_fault(Fault(status=429, retry_after=20))
    assert (await post(sc, model="chat", **CHAT))[1]["x-kubetoll-backend"] == "secondary"
    assert breaker(sc, "primary").retry_in() == 20
    clock.advance(20.5)
    assert (await post(sc, model="chat", **CHAT))[1]["x-kubetoll-backend"] == "primary"


# --------------------------------------------------------------------------- Retry-After end to end


def http_date_in(seconds: float) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize(
    "fault,open_for",
    [
        (Fault(status=429, retry_after=float("inf")), 60.0),
        (Fault(status=429, retry_after=1e9), 60.0),
        (Fault(status=503, retry_after=float("inf")), 60.0),
        (Fault(status=429, retry_after=float("nan")), None),
        (Fault(status=429, retry_after=-5), None),
    ],
    ids=["429-inf", "429-1e9", "503-inf", "429-nan", "429-negative"],
)
async def test_retry_after_is_cut_to_the_backends_maximum_or_ignored(sim, sim2, running, fault, open_for):
    clock = FakeMonotonic()
    primary = backend("primary", "openai", sim.url, circuitBreaker={"maxRetryAfterSeconds": 60})
    cfg = config(
        [primary, backend("secondary", "openai", sim2.url)], {"solo": ["primary"], "chat": ["primary", "secondary"]}
    )
    sc = await running(cfg, monotonic=clock)
    sim.enqueue_fault(fault)
    # With no backend left the client gets the wait, in whole seconds: never a 500.
    status, headers, body = await post(sc, model="solo", **CHAT)
    assert status in (502, 503) and body["error"]["code"] == "all_backends_failed"
    b = breaker(sc, "primary")
    if open_for is None:
        # Not a usable wait: ignored; one failure under the threshold (5) leaves the circuit closed.
        assert b.state == "closed" and headers["Retry-After"] == "1"  # the sidecar's own 503 default
        assert (await post(sc, model="chat", **CHAT))[1]["x-kubetoll-backend"] == "primary"
        return
    assert headers["Retry-After"] == "60" and b.retry_in() == open_for
    calls = len(sim.requests)
    clock.advance(open_for - 1)
    assert (await post(sc, model="chat", **CHAT))[1]["x-kubetoll-backend"] == "secondary"
    assert len(sim.requests) == calls  # still open: primary not called
    clock.advance(2)  # past the cut: one probe goes through, succeeds, closes the circuit
    assert (await post(sc, model="chat", **CHAT))[1]["x-kubetoll-backend"] == "primary"
    assert b.state == "closed"


@pytest.mark.parametrize("provider", ["openai", "anthropic"])  # the OpenAI translator used to ignore dates
async def test_retry_after_as_an_http_date(sim, sim2, running, provider):
    clock = FakeMonotonic()
    cfg = config(
        [backend("primary", provider, sim.url), backend("secondary", "openai", sim2.url)],
        {"chat": ["primary", "secondary"]},
    )
    sc = await running(cfg, monotonic=clock)
    sim.enqueue_fault(Fault(status=429, retry_after_header=http_date_in(30)))
    assert (await post(sc, model="chat", **CHAT))[1]["x-kubetoll-backend"] == "secondary"
    # Measured from the response's Date header (whole seconds on both sides).
    assert 28 <= breaker(sc, "primary").retry_in() <= 31


# --------------------------------------------------------------------------- 400 for what no backend can do


def anthropic_only(sim) -> dict[str, object]:
    return config([backend("claude", "anthropic", sim.url)], {"chat": ["claude"]})


@pytest.mark.parametrize(
    "path,body,capability,param",
    [
        ("/v1/chat/completions", {**CHAT, "n": 9}, "n > 8", "n"),
        ("/v1/embeddings", {"input": "hello"}, "/v1/embeddings", None),
        ("/v1/completions", {"prompt": "hello"}, "/v1/completions", None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}, {"role": "function", "name": "f", "content": "1"}]},
            "`function` role",
            "messages",
        ),
    ],
    ids=["n=9", "embeddings", "completions", "function-role"],
)
async def test_what_no_backend_of_the_route_can_serve_is_a_400_before_any_upstream_call(
    sim, running, path, body, capability, param
):
    sc = await running(anthropic_only(sim))
    status, _, got = await post(sc, path, model="chat", **body)
    assert status == 400, got
    err = got["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "unsupported_by_route"
    assert capability in err["message"] and "route `chat`" in err["message"] and "claude (anthropic)" in err["message"]
    assert err["param"] == param
    assert sim.requests == []  # decided before forwarding


async def test_an_sdk_does_not_retry_it(sim, running):
    """The reason it is a 400: SDKs retry 5xx (three requests for one call were counted)."""
    sc = await running(anthropic_only(sim))
    client = openai.AsyncOpenAI(base_url=sc.url + "/v1", api_key="unused", max_retries=2)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="chat", n=9, **CHAT)
    await client.close()
    assert requests_counted(sc) == 1 and sim.requests == []


async def test_a_route_with_one_capable_backend_still_serves_it(sim, sim2, running):
    cfg = config(
        [backend("claude", "anthropic", sim.url), backend("gpt", "openai", sim2.url)], {"chat": ["claude", "gpt"]}
    )
    sc = await running(cfg)
    status, headers, body = await post(sc, model="chat", n=9, **CHAT)
    assert status == 200 and headers["x-kubetoll-backend"] == "gpt" and len(body["choices"]) == 9
    assert sim.requests == []  # claude was skipped, not asked


async def test_what_no_capability_names_is_a_400_when_every_backend_skips_it(sim, running):
    """Audio input has no declared capability: each backend skips it at build time, nothing is
    sent, and the answer is still a 400 (not a 502 the SDK would retry)."""
    sc = await running(anthropic_only(sim))
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    status, _, body = await post(sc, model="chat", messages=[{"role": "user", "content": [audio]}])
    assert status == 400 and body["error"]["code"] == "unsupported_by_route", body
    assert "audio" in body["error"]["message"] and sim.requests == []


# --------------------------------------------------------------------------- a reservation that can never fit


def budget_config(sim, budget: dict[str, object], max_output: int | None = None) -> dict[str, object]:
    cfg = config([backend("primary", "openai", sim.url)], {"chat": ["primary"]}, budgets=[budget])
    if max_output is not None:
        cfg["routes"][0]["maxOutputTokens"] = max_output  # type: ignore[index]
    return cfg


@pytest.mark.parametrize(
    "budget,label",
    [
        ({"name": "b", "tiers": {"default": {"tokensPerMinute": 1000}}}, "b/tier:default/tokens-per-minute"),
        ({"name": "b", "cap": {"tokensPerDay": 1000}}, "b/cap/tokens-day"),
        ({"name": "b", "cap": {"usdPerDay": 0.01}}, "b/cap/usd-day"),
    ],
    ids=["tier-tokens-per-minute", "cap-tokens-per-day", "cap-usd-per-day"],
)
async def test_max_tokens_beyond_the_whole_allowance_is_a_400_naming_the_limit(sim, running, budget, label):
    sc = await running(budget_config(sim, budget), clock=FakeClock(T0))
    status, headers, body = await post(sc, model="chat", max_tokens=100_000, **CHAT)
    assert status == 400, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "exceeds_budget_limit"
    assert err["param"] == "max_tokens" and label in err["message"] and "Lower max_tokens" in err["message"]
    assert "Retry-After" not in headers and sim.requests == []
    # What does fit is served: the limit was not spent by the refused request.
    assert (await post(sc, model="chat", max_tokens=50, **CHAT))[0] == 200


async def test_a_route_output_cap_keeps_the_same_request_within_the_limit(sim, running):
    cfg = budget_config(sim, {"name": "b", "tiers": {"default": {"tokensPerMinute": 1000}}}, max_output=100)
    sc = await running(cfg, clock=FakeClock(T0))
    assert (await post(sc, model="chat", max_tokens=100_000, **CHAT))[0] == 200


async def test_a_level_that_allows_overage_still_serves_it(sim, running):
    cfg = budget_config(sim, {"name": "b", "cap": {"tokensPerDay": 1000}, "capOnExhausted": "allow"})
    sc = await running(cfg, clock=FakeClock(T0))
    assert (await post(sc, model="chat", max_tokens=100_000, **CHAT))[0] == 200


async def test_an_exhausted_level_is_still_a_429_with_retry_after(sim, running):
    """Only what could never fit is a 400: a request that fits an empty period waits as before."""
    sc = await running(budget_config(sim, {"name": "b", "cap": {"tokensPerDay": 100}}), clock=FakeClock(T0))
    served = 0
    while (got := await post(sc, model="chat", max_tokens=60, **CHAT))[0] == 200:
        served += 1  # each settles at its actual use (~25 tokens), under its reservation (~68)
        assert served < 5
    status, headers, body = got
    assert served >= 1 and status == 429 and body["error"]["code"] == "budget_exhausted"
    assert int(headers["Retry-After"]) > 0
