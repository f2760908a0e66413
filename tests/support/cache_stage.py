"""Helpers for the cache stage's tests: a hand-moved clock, a config, requests and answers.

The fixtures (`redis`, `stages`, `clock`, `embed_server`, `http`) are in tests/conftest.py.
"""

from __future__ import annotations

import time
from typing import Any

from kubetoll_core.router_config import RouterConfig
from kubetoll_sidecar.cache import CacheStage
from kubetoll_sidecar.providers.base import Usage


class FakeClock:
    """Both clocks of a CacheStage, moved by hand: a TTL or a cool-down expires without a sleep."""

    def __init__(self) -> None:
        self.now = time.time()  # wall: entries carry it to Redis, so start from the real time
        self.mono = 1000.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds

    @property
    def clocks(self) -> dict[str, Any]:
        """The keyword arguments that give a CacheStage this clock."""
        return {"wall": self.wall, "monotonic": self.monotonic}


def make_config(ns: str, embed_url: str | None = None, **policy: Any) -> RouterConfig:
    pol: dict[str, Any] = {"name": "faq", "cacheable": {"maxTemperature": 0.5}}
    for k, v in policy.items():
        pol[k] = v
    backends = [{"name": "primary", "provider": "openai", "model": "gpt-4o", "endpoint": "http://127.0.0.1:9/v1"}]
    if embed_url:
        backends.append(
            {
                "name": "embedder",
                "provider": "openai-compatible",
                "model": "hashed",
                "endpoint": embed_url,
                "pricing": {"inputPerMTok": 0.02, "outputPerMTok": 0},
            }
        )
    return RouterConfig.model_validate(
        {
            "namespace": ns,
            "backends": backends,
            "routes": [
                {"name": "chat", "rules": [{"backends": ["primary"]}], "cachePolicy": "faq"},
                {"name": "other", "rules": [{"backends": ["primary"]}], "cachePolicy": "faq"},
            ],
            "cachePolicies": [pol],
        }
    )


SEMANTIC = {
    "exact": {"enabled": False},
    "semantic": {"enabled": True, "embeddingBackend": "embedder", "threshold": 0.5},
}


def request(question: str = "How do I reset my password?", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "chat",
        "messages": [
            {"role": "system", "content": "You are the support bot of Acme."},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
    }
    body.update(fields)
    return body


def answer(text: str = "Go to Settings, then Reset password.", finish: str | None = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-original",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
    }


async def ask(
    stage: CacheStage,
    body: dict[str, Any],
    *,
    tenant: str = "alice",
    route: str = "chat",
    endpoint: str = "chat",
    headers: dict[str, str] | None = None,
    reply: str | None = None,
    cost: float = 0.0042,
):
    lk = await stage.lookup("faq", route, tenant, endpoint, body, headers)
    if lk.should_store and reply is not None:
        assert await stage.store(lk, answer(reply), Usage(30, 9), cost)
    return lk


def sample(stage: CacheStage, name: str, **labels: str) -> float:
    return stage.metrics.registry.get_sample_value(name, labels) or 0.0
