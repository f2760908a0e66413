"""Stage units on their own: prices, token estimates, routing rules, SSE decoding, circuit breaker."""

from __future__ import annotations

import pytest
import tiktoken
from genai_prices import Usage as CatalogUsage
from genai_prices import calc_price

from kubetoll_core.prices import PricingError, resolve_price
from kubetoll_core.router_config import Backend, RouterConfig
from kubetoll_sidecar import tokens
from kubetoll_sidecar.circuit import CircuitBreaker
from kubetoll_sidecar.providers.base import Usage
from kubetoll_sidecar.routing import RouteContext, Router
from kubetoll_sidecar.sse import SSEDecoder


def backend(**kw):
    base = {"name": "b", "provider": "openai", "model": "gpt-4o", "endpoint": "https://api.openai.com/v1"}
    return Backend.model_validate(base | kw)


@pytest.mark.parametrize(
    "provider,model,usage",
    [
        ("openai", "gpt-4o", Usage(1200, 300, cached_tokens=1000)),
        ("openai", "gpt-4o-mini", Usage(50_000, 2_000)),
        ("anthropic", "claude-sonnet-4-5", Usage(10_000, 500, cached_tokens=4_000, cache_write_tokens=2_000)),
        ("anthropic", "claude-sonnet-4-5", Usage(250_000, 1_000)),  # over the 200k tier cliff
        ("anthropic", "claude-3-5-haiku-latest", Usage(900, 120)),
    ],
)
def test_catalogue_prices_agree_with_genai_prices(provider, model, usage):
    ours = resolve_price(backend(provider=provider, model=model, endpoint="https://x.example/v1")).cost(usage)
    uncached = usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens
    if provider == "anthropic":
        ref_usage = CatalogUsage(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            cache_read_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
        )
    else:
        ref_usage = CatalogUsage(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            cache_read_tokens=usage.cached_tokens,
        )
    ref = float(calc_price(ref_usage, model_ref=model, provider_id=provider).total_price)
    assert uncached >= 0
    assert ours == pytest.approx(ref, abs=1e-6)


def test_overrides_and_gpu_shadow_price():
    p = resolve_price(backend(pricing={"inputPerMTok": 1.0, "outputPerMTok": 4.0, "cachedInputPerMTok": 0.1}))
    assert p.cost(Usage(1_000_000, 1_000_000, cached_tokens=500_000)) == pytest.approx(0.5 + 0.05 + 4.0)
    gpu = resolve_price(
        backend(provider="openai-compatible", model="llama", pricing={"gpuHourlyUSD": 3.6, "tokensPerSecond": 1000})
    )
    # $3.60/h over 3.6M tokens/h = $1 per million tokens, input and output alike.
    assert gpu.cost(Usage(600_000, 400_000)) == pytest.approx(1.0)
    with pytest.raises(PricingError, match="no price catalogue"):
        resolve_price(backend(provider="openai-compatible", model="llama"))
    with pytest.raises(PricingError, match="not in the price catalogue"):
        resolve_price(backend(model="no-such-model-xyz"))


def test_token_counts_match_tiktoken():
    text = "Kubetoll routes LLM traffic within a budget. " * 40
    assert tokens.count_text(text, "gpt-4o") == len(tiktoken.get_encoding("o200k_base").encode(text))
    assert tokens.count_text(text, "gpt-4") == len(tiktoken.get_encoding("cl100k_base").encode(text))
    assert tokens.encoding_for_model("claude-3-5-haiku").approximate
    assert not tokens.encoding_for_model("openai/gpt-4o-mini").approximate
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    enc = tiktoken.get_encoding("o200k_base")
    # OpenAI's formula: 3 per message, the role and the content encoded, 3 for the reply priming.
    expected = (
        3
        + 2 * 3
        + len(enc.encode("system"))
        + len(enc.encode("user"))
        + len(enc.encode("be brief"))
        + len(enc.encode(text))
    )
    assert tokens.count_chat(msgs, "gpt-4o") == expected
    # Memoised: the same long message again gives the same count.
    assert tokens.count_chat(msgs, "gpt-4o") == expected


def test_routing_rules_in_order():
    cfg = RouterConfig.model_validate(
        {
            "backends": [backend(name=n).model_dump(by_alias=True) for n in ("big", "small", "gpu", "vip", "hdr")],
            "routes": [
                {
                    "name": "r",
                    "rules": [
                        {"match": {"tenants": ["acme"]}, "backends": ["vip"]},
                        {"match": {"minPromptTokens": 1000}, "backends": ["gpu"]},
                        {"match": {"header": {"name": "x-priority", "value": "high"}}, "backends": ["hdr"]},
                        {"match": {"keywords": ["refund", "invoice"], "tiers": ["premium"]}, "backends": ["big"]},
                        {"match": {"regex": r"(?i)\bcode\b"}, "backends": ["big", "small"]},
                        {"backends": ["small"]},
                    ],
                }
            ],
        }
    )
    route = Router(cfg, {}).get("r")

    def pick(tokens=10, tenant="t", tier="free", headers=None, text="hello"):
        return route.select(RouteContext(tokens, tenant, tier, headers or {}, lambda: text)).backends

    assert pick(tenant="acme") == ("vip",)
    assert pick(tokens=5000) == ("gpu",)
    assert pick(headers={"x-priority": "high"}) == ("hdr",)
    assert pick(tier="premium", text="I need a Refund now") == ("big",)
    assert pick(tier="free", text="I need a refund") == ("small",)  # tier condition fails
    assert pick(text="refunds") == ("small",)  # whole words only
    assert pick(text="write some code") == ("big", "small")
    assert pick() == ("small",)


def test_pod_selector_limits_routes():
    cfg = RouterConfig.model_validate(
        {
            "backends": [backend().model_dump(by_alias=True)],
            "routes": [
                {"name": "all", "rules": [{"backends": ["b"]}]},
                {"name": "team-a", "podSelector": {"team": "a"}, "rules": [{"backends": ["b"]}]},
            ],
        }
    )
    assert Router(cfg, {"team": "b"}).names() == ["all"]
    assert Router(cfg, {"team": "a", "x": "y"}).names() == ["all", "team-a"]


def test_sse_decoder_handles_arbitrary_splits():
    stream = b'event: message_start\ndata: {"a":1}\n\n: comment\n\ndata: {"b":\ndata: 2}\r\n\r\ndata: [DONE]\n\n'
    for size in (1, 2, 3, 7, 64):
        d = SSEDecoder()
        events = []
        for i in range(0, len(stream), size):
            events.extend(d.feed(stream[i : i + size]))
        assert events == [("message_start", b'{"a":1}'), (None, b'{"b":\n2}'), (None, b"[DONE]")]


def test_circuit_breaker_states():
    now = [0.0]
    cb = CircuitBreaker(threshold=2, cooldown=10, now=lambda: now[0])
    cb.failure("500")
    assert cb.allow()
    cb.failure("500")
    assert cb.state == "open" and not cb.allow()
    now[0] = 10.5
    assert cb.allow()  # the probe
    assert not cb.allow()  # only one probe at a time
    cb.failure("500")  # failed probe: open again
    assert cb.state == "open" and cb.retry_in() == pytest.approx(10)
    now[0] = 21
    assert cb.allow()
    cb.success()
    assert cb.state == "closed" and cb.allow()
    cb.failure("429", retry_after=42)
    assert cb.state == "open" and cb.retry_in() == pytest.approx(42)


def test_config_rejects_credentials_in_headers_and_urls():
    with pytest.raises(ValueError, match="carries a credential"):
        backend(headers={"Authorization": "Bearer x"})
    with pytest.raises(ValueError, match="must not carry credentials"):
        RouterConfig.model_validate({"budgetStore": {"url": "redis://user:pass@host:6379"}})


@pytest.mark.parametrize(
    ("models", "load", "approximate"),
    [
        (["gpt-4"], ["cl100k_base"], "cl100k_base"),
        (["gpt-4o-mini"], ["o200k_base"], "o200k_base"),
        (["claude-3-5-haiku-latest"], ["cl100k_base"], "cl100k_base"),
        # An approximate family beside an exact o200k_base model: counted with o200k_base, no second table.
        (["gpt-4o-mini", "meta-llama/Llama-3.1-8B-Instruct"], ["o200k_base"], "o200k_base"),
        # ... beside an exact cl100k_base model (with or without o200k_base): cl100k_base, as always.
        (["gpt-4", "claude-3-5-haiku-latest"], ["cl100k_base"], "cl100k_base"),
        (["gpt-4o", "gpt-4", "mistral-large"], ["o200k_base", "cl100k_base"], "cl100k_base"),
        (["gpt-4o", "gpt-4"], ["o200k_base", "cl100k_base"], "cl100k_base"),
    ],
)
def test_the_encodings_a_config_loads_and_what_approximate_models_are_counted_with(models, load, approximate):
    assert tokens.approximate_encoding() == tokens.CL100K  # the default, before any config
    assert tokens.encodings_for(models) == load
    assert tokens.approximate_encoding() == tokens.CL100K  # only planned, not applied
    assert tokens.use_encodings_for(models) == load
    assert tokens.approximate_encoding() == approximate
    choice = tokens.encoding_for_model("qwen2.5-72b-instruct")
    assert choice.approximate and choice.name == approximate
    assert tokens.encoding_for_model("gpt-4o") == tokens.EncodingChoice("o200k_base", False)  # exact: unchanged
    text = "Ünïcödé text and some English words, 12345"
    assert tokens.count_text(text, "qwen2.5-72b-instruct") == len(tiktoken.get_encoding(approximate).encode(text))
